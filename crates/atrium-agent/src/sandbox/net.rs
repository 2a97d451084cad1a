//! Each tenant's network on this node: a named network namespace with one
//! veth to the host (a /30 from the agent's `10.<octet>.0.0/16`, no
//! default route), and the agent's nftables table, which drops whatever a
//! tenant interface sends to the host unless it answers a connection the
//! host opened, and forwards nothing to or from tenant interfaces.
//!
//! One opening, when the agent relays to the provider's PostgreSQL
//! (`relay`): new connections from tenant interfaces to the relay's port,
//! which nothing else may reach; inside each namespace the well-known
//! database address is routed to the host and translated to the relay.

use std::path::Path;

use super::{input_chain, replacing_table, run, run_with_input, Host, SandboxError, TenantSlot};

/// Replicas of one tenant start and stop concurrently: one at a time makes
/// or removes a tenant's namespace, the others find it made.
static NETWORK: std::sync::Mutex<()> = std::sync::Mutex::new(());

impl Host {
    pub fn netns_name(&self, tenant: &str) -> String {
        format!("atrium{}-{tenant}", self.octet())
    }

    pub(super) fn veth_names(&self, slot: u32) -> (String, String) {
        let stem = format!("at{}t{slot}", self.octet());
        (format!("{stem}h"), format!("{stem}n"))
    }

    /// Host-side and namespace-side addresses of a tenant slot's /30.
    pub fn addresses(&self, slot: u32) -> (String, String) {
        let base = slot * 4;
        let net = format!("10.{}.{}", self.octet(), base / 256);
        (
            format!("{net}.{}", base % 256 + 1),
            format!("{net}.{}", base % 256 + 2),
        )
    }

    pub(super) fn firewall_table(&self) -> String {
        format!("atrium_{}", self.octet())
    }

    /// Installs this agent's firewall table, replacing an older one in the
    /// same transaction.
    pub(super) fn install_firewall(&self) -> Result<(), SandboxError> {
        let (table, ifaces) = (self.firewall_table(), format!("at{}t*", self.octet()));
        let (relay_open, relay_closed) = match self.config.database_relay {
            Some(port) => (
                format!("iifname \"{ifaces}\" tcp dport {port} accept\n"),
                format!("tcp dport {port} drop\n"),
            ),
            None => (String::new(), String::new()),
        };
        let input = input_chain(&format!(
            "iifname \"{ifaces}\" ct state established,related accept\n\
             {relay_open}\
             iifname \"{ifaces}\" drop\n\
             {relay_closed}"
        ));
        let forward = format!(
            "chain forward {{\n\
             type filter hook forward priority -10; policy accept;\n\
             iifname \"{ifaces}\" drop\n\
             oifname \"{ifaces}\" drop\n\
             }}\n"
        );
        let rules = replacing_table("inet", &table, &format!("{input}{forward}"));
        run_with_input("nft", &["-f", "-"], &rules)
    }

    pub(super) fn remove_firewall(&self) {
        let _ = run("nft", &["delete", "table", "inet", &self.firewall_table()]);
    }

    pub(super) fn ensure_network(&self, t: &TenantSlot) -> Result<(), SandboxError> {
        let _one_at_a_time = NETWORK.lock().unwrap_or_else(|p| p.into_inner());
        let ns = self.netns_name(&t.tenant);
        let (host_if, ns_if) = self.veth_names(t.slot);
        let (host_ip, ns_ip) = self.addresses(t.slot);
        let complete = Path::new("/run/netns").join(&ns).exists()
            && run("ip", &["link", "show", "dev", &host_if]).is_ok();
        if complete {
            // The relay's port is new at each agent start.
            return self.route_databases(&ns, &host_ip);
        }
        // Half-made by a crash: start over.
        let _ = run("ip", &["netns", "del", &ns]);
        let _ = run("ip", &["link", "del", &host_if]);
        run("ip", &["netns", "add", &ns])?;
        run(
            "ip",
            &[
                "link", "add", &host_if, "type", "veth", "peer", "name", &ns_if, "netns", &ns,
            ],
        )?;
        run(
            "ip",
            &["addr", "add", &format!("{host_ip}/30"), "dev", &host_if],
        )?;
        run("ip", &["link", "set", &host_if, "up"])?;
        run(
            "ip",
            &[
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{ns_ip}/30"),
                "dev",
                &ns_if,
            ],
        )?;
        run("ip", &["-n", &ns, "link", "set", &ns_if, "up"])?;
        run("ip", &["-n", &ns, "link", "set", "lo", "up"])?;
        self.route_databases(&ns, &host_ip)
    }

    /// Sends the namespace's connections to the well-known database
    /// address to the agent's relay on the host side of its veth (nothing
    /// when the agent relays to no PostgreSQL). Rendered from typed
    /// addresses and ports only.
    fn route_databases(&self, ns: &str, host_ip: &str) -> Result<(), SandboxError> {
        let Some(port) = self.config.database_relay else {
            return Ok(());
        };
        let (at, at_port) = (
            atrium_core::database::WORKLOAD_HOST,
            atrium_core::database::WORKLOAD_PORT,
        );
        run(
            "ip",
            &[
                "-n",
                ns,
                "route",
                "replace",
                &format!("{at}/32"),
                "via",
                host_ip,
            ],
        )?;
        let table = replacing_table(
            "ip",
            "atrium_databases",
            &format!(
                "chain output {{\n\
                 type nat hook output priority -100; policy accept;\n\
                 ip daddr {at} tcp dport {at_port} dnat ip to {host_ip}:{port}\n\
                 }}\n"
            ),
        );
        run_with_input("ip", &["netns", "exec", ns, "nft", "-f", "-"], &table)
    }

    /// Removes a tenant's namespace and veth (its last workload here ended).
    pub(super) fn remove_network(&self, tenant: &TenantSlot) {
        let _one_at_a_time = NETWORK.lock().unwrap_or_else(|p| p.into_inner());
        let _ = run("ip", &["netns", "del", &self.netns_name(&tenant.tenant)]);
        let _ = run("ip", &["link", "del", &self.veth_names(tenant.slot).0]);
    }
}
