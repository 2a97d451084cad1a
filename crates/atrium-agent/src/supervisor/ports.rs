//! Ports in a tenant's namespace: which one a new engine listens on, and
//! whether a container's ports are free. A port is held by the replica
//! recorded with it in the agent's state (engines as `http://ip:port`,
//! containers as `tcp://ip:port`), so replicas of one tenant never race
//! for one.

use super::ReplicaCtx;
use crate::state::RunningEngine;

/// Ports engines listen on inside their tenant's namespace.
const FIRST_ENGINE_PORT: u16 = 8000;

fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// The port an engine (`http://ip:port`) or a container (`tcp://ip:port`)
/// holds at `ip`, if its endpoint is there.
fn port_at(endpoint: &str, ip: &str) -> Option<u16> {
    let addr = endpoint
        .strip_prefix("http://")
        .or_else(|| endpoint.strip_prefix("tcp://"))?;
    addr.strip_prefix(ip)?.strip_prefix(':')?.parse().ok()
}

impl ReplicaCtx {
    /// Reserves a port for a new engine at `ip` by recording the engine
    /// (pid still unknown) in the state: any free loopback port when it
    /// runs unsandboxed, else the lowest one no other engine or container
    /// of the tenant's namespace holds — replicas of one tenant start side
    /// by side.
    pub(super) fn reserve_port(
        &self,
        ip: &str,
        isolation: &str,
        restarts: u32,
    ) -> std::io::Result<RunningEngine> {
        let loopback = if ip == "127.0.0.1" {
            Some(free_port()?)
        } else {
            None
        };
        self.shared.state.update(|s| {
            let used: Vec<u16> = s
                .running
                .iter()
                .filter(|(id, _)| **id != self.id)
                .filter_map(|(_, r)| port_at(&r.endpoint, ip))
                .collect();
            let port = loopback
                .or_else(|| (FIRST_ENGINE_PORT..u16::MAX).find(|p| !used.contains(p)))
                .ok_or_else(|| std::io::Error::other("no free port in the tenant's namespace"))?;
            let engine = RunningEngine {
                pid: 0,
                start_ticks: 0,
                endpoint: format!("http://{ip}:{port}"),
                isolation: isolation.to_string(),
                restarts,
            };
            s.running.insert(self.id.clone(), engine.clone());
            Ok(engine)
        })
    }

    /// Records the replica with the ports it listens on, refusing ports
    /// another replica in the same namespace holds.
    pub(super) fn reserve_ports(
        &self,
        ip: &str,
        ports: &[u16],
        isolation: &str,
        restarts: u32,
    ) -> Result<RunningEngine, String> {
        self.shared.state.update(|s| {
            let taken = s
                .running
                .iter()
                .filter(|(id, _)| **id != self.id)
                .find_map(|(id, r)| {
                    let port = port_at(&r.endpoint, ip)?;
                    ports.contains(&port).then(|| (id.clone(), port))
                });
            if let Some((other, port)) = taken {
                return Err(format!(
                    "{ip}:{port} is held by replica {other} of the same tenant on this node"
                ));
            }
            let engine = RunningEngine {
                pid: 0,
                start_ticks: 0,
                endpoint: ports
                    .first()
                    .map(|p| format!("tcp://{ip}:{p}"))
                    .unwrap_or_default(),
                isolation: isolation.to_string(),
                restarts,
            };
            s.running.insert(self.id.clone(), engine.clone());
            Ok(engine)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::port_at;

    #[test]
    fn engines_and_containers_hold_ports_of_their_own_address_only() {
        assert_eq!(port_at("http://10.200.7.2:8100", "10.200.7.2"), Some(8100));
        assert_eq!(port_at("tcp://10.200.7.2:8080", "10.200.7.2"), Some(8080));
        assert_eq!(port_at("tcp://10.200.7.23:8080", "10.200.7.2"), None);
        assert_eq!(port_at("tcp://10.200.7.2", "10.200.7.2"), None);
        assert_eq!(port_at("unix:///x", "10.200.7.2"), None);
    }
}
