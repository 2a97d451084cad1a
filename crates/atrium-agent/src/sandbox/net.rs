//! Each tenant's network on this node: a named network namespace with one
//! veth to the host (a /30 from the agent's `10.<octet>.0.0/16`, no
//! default route), and the agent's nftables table, which drops whatever a
//! tenant interface sends to the host unless it answers a connection the
//! host opened, and forwards nothing to or from tenant interfaces.

use std::path::Path;

use super::{run, run_with_input, Host, SandboxError, TenantSlot};

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
        let rules = format!(
            "add table inet {table}\n\
                 delete table inet {table}\n\
                 table inet {table} {{\n\
                 chain input {{\n\
                 type filter hook input priority -10; policy accept;\n\
                 iifname \"{ifaces}\" ct state established,related accept\n\
                 iifname \"{ifaces}\" drop\n\
                 }}\n\
                 chain forward {{\n\
                 type filter hook forward priority -10; policy accept;\n\
                 iifname \"{ifaces}\" drop\n\
                 oifname \"{ifaces}\" drop\n\
                 }}\n\
                 }}\n"
        );
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
            && Path::new("/sys/class/net").join(&host_if).exists();
        if complete {
            return Ok(());
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
        run("ip", &["-n", &ns, "link", "set", "lo", "up"])
    }

    /// Removes a tenant's namespace and veth (its last workload here ended).
    pub(super) fn remove_network(&self, tenant: &TenantSlot) {
        let _one_at_a_time = NETWORK.lock().unwrap_or_else(|p| p.into_inner());
        let _ = run("ip", &["netns", "del", &self.netns_name(&tenant.tenant)]);
        let _ = run("ip", &["link", "del", &self.veth_names(tenant.slot).0]);
    }
}
