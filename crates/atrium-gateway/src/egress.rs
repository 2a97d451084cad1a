//! Where the gateway may connect on a tenant's behalf: its egress policy.
//!
//! An `external` deployment names a URL the gateway calls for the tenant.
//! The gateway runs on the host, which reaches every tenant's replicas
//! (the agents' tenant networks), the control plane, the node's own
//! services and its cloud's metadata endpoint: a URL pointing there would
//! let one tenant be served by another's replica (billed to the victim)
//! or read the provider's internals. So an external upstream's host is
//! resolved by the gateway itself, every address it resolves to is
//! checked, and the connection goes to a checked address only (a DNS
//! answer that changes between the check and the connect — rebinding —
//! cannot redirect it). Refused: loopback, private, link-local,
//! carrier-grade NAT, multicast and other special-purpose ranges (IPv4
//! inside IPv6 judged as IPv4), and any address of this host. The
//! provider opens ranges it means tenants to reach with
//! `--external-allow CIDR`.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::str::FromStr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use atrium_core::url::{Host, UpstreamUrl};

/// How long a checked resolution is used before the host is resolved again.
const RESOLVED_FOR: Duration = Duration::from_secs(30);

/// An IP network, `addr/prefix`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

impl FromStr for Cidr {
    type Err = String;

    fn from_str(s: &str) -> Result<Cidr, String> {
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = addr
            .parse()
            .map_err(|_| format!("{s:?} is not an address or network (a.b.c.d/n, x::y/n)"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => p
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| format!("{s:?}: the prefix length must be 0 to {max}"))?,
        };
        Ok(Cidr { addr, prefix })
    }
}

impl Cidr {
    const fn v4(a: u8, b: u8, c: u8, d: u8, prefix: u8) -> Cidr {
        Cidr {
            addr: IpAddr::V4(Ipv4Addr::new(a, b, c, d)),
            prefix,
        }
    }

    const fn v6(segments: [u16; 8], prefix: u8) -> Cidr {
        let [a, b, c, d, e, f, g, h] = segments;
        Cidr {
            addr: IpAddr::V6(Ipv6Addr::new(a, b, c, d, e, f, g, h)),
            prefix,
        }
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// Ranges no upstream may be in unless allowed: what they are, for the
/// refusal.
const INTERNAL: &[(Cidr, &str)] = &[
    (Cidr::v4(0, 0, 0, 0, 8), "\"this network\""),
    (Cidr::v4(10, 0, 0, 0, 8), "a private range"),
    (Cidr::v4(100, 64, 0, 0, 10), "carrier-grade NAT space"),
    (Cidr::v4(127, 0, 0, 0, 8), "loopback"),
    (Cidr::v4(169, 254, 0, 0, 16), "link-local (cloud metadata)"),
    (Cidr::v4(172, 16, 0, 0, 12), "a private range"),
    (Cidr::v4(192, 0, 0, 0, 24), "IETF protocol assignments"),
    (Cidr::v4(192, 168, 0, 0, 16), "a private range"),
    (Cidr::v4(198, 18, 0, 0, 15), "benchmarking space"),
    (Cidr::v4(224, 0, 0, 0, 4), "multicast"),
    (Cidr::v4(240, 0, 0, 0, 4), "reserved space"),
    (
        Cidr::v6([0, 0, 0, 0, 0, 0, 0, 0], 128),
        "the unspecified address",
    ),
    (Cidr::v6([0, 0, 0, 0, 0, 0, 0, 1], 128), "loopback"),
    (Cidr::v6([0xfe80, 0, 0, 0, 0, 0, 0, 0], 10), "link-local"),
    (Cidr::v6([0xfec0, 0, 0, 0, 0, 0, 0, 0], 10), "site-local"),
    (
        Cidr::v6([0xfc00, 0, 0, 0, 0, 0, 0, 0], 7),
        "a unique-local (private) range",
    ),
    (Cidr::v6([0xff00, 0, 0, 0, 0, 0, 0, 0], 8), "multicast"),
];

/// IPv4 carried in IPv6 (mapped `::ffff:a.b.c.d`, NAT64 `64:ff9b::a.b.c.d`)
/// is judged as the IPv4 address it reaches.
fn unwrap_v4(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => {
            let s = v6.segments();
            let embedded = Ipv4Addr::from(u32::try_from(u128::from(v6) & 0xffff_ffff).unwrap_or(0));
            if s[..6] == [0, 0, 0, 0, 0, 0xffff] || s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
                IpAddr::V4(embedded)
            } else {
                ip
            }
        }
        v4 => v4,
    }
}

/// Whether `ip` is an address of this host: a datagram socket "connected"
/// to it (nothing is sent) picks it as its own source address.
fn is_own_address(ip: IpAddr) -> bool {
    let any: SocketAddr = match ip {
        IpAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        IpAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    UdpSocket::bind(any)
        .and_then(|s| {
            s.connect((ip, 9))?;
            s.local_addr()
        })
        .is_ok_and(|local| local.ip() == ip)
}

#[derive(Debug, Default)]
pub struct EgressPolicy {
    allow: Vec<Cidr>,
}

impl EgressPolicy {
    pub fn new(allow: Vec<Cidr>) -> EgressPolicy {
        EgressPolicy { allow }
    }

    /// Why the gateway may not connect to `ip` for a tenant, if it may not.
    pub fn check(&self, ip: IpAddr) -> Result<(), String> {
        let judged = unwrap_v4(ip);
        if self.allow.iter().any(|c| c.contains(judged)) {
            return Ok(());
        }
        if let Some((net, what)) = INTERNAL.iter().find(|(net, _)| net.contains(judged)) {
            return Err(format!("{ip}, in {what} ({net})"));
        }
        if is_own_address(judged) {
            return Err(format!("{ip}, an address of the gateway's own host"));
        }
        Ok(())
    }

    /// The addresses of `url`'s host the gateway may connect to: all of
    /// them, or a refusal naming the first address that may not be used
    /// (a name that resolves to both a public and an internal address is
    /// refused whole).
    pub async fn resolve(&self, url: &UpstreamUrl) -> Result<Vec<SocketAddr>, String> {
        let addrs: Vec<SocketAddr> = match &url.host {
            Host::Ip(ip) => vec![SocketAddr::new(*ip, url.port)],
            Host::Name(name) => tokio::net::lookup_host((name.as_str(), url.port))
                .await
                .map_err(|e| format!("cannot resolve {name}: {e}"))?
                .collect(),
        };
        if addrs.is_empty() {
            return Err(format!("{} resolves to no address", url.host));
        }
        for a in &addrs {
            self.check(a.ip()).map_err(|why| {
                format!(
                    "the external upstream {url} resolves to {why}: the gateway does not \
                     connect to internal addresses for tenants (the provider may allow a \
                     range with --external-allow CIDR)"
                )
            })?;
        }
        Ok(addrs)
    }
}

/// A checked resolution kept for a while, so a request to an external
/// upstream does not wait on DNS every time.
#[derive(Debug, Default)]
pub struct Resolved(Mutex<Option<(Instant, Vec<SocketAddr>)>>);

impl Resolved {
    pub async fn get(
        &self,
        policy: &EgressPolicy,
        url: &UpstreamUrl,
    ) -> Result<Vec<SocketAddr>, String> {
        if let Ok(cached) = self.0.lock() {
            if let Some((at, addrs)) = cached.as_ref() {
                if at.elapsed() < RESOLVED_FOR {
                    return Ok(addrs.clone());
                }
            }
        }
        let addrs = policy.resolve(url).await?;
        if let Ok(mut cached) = self.0.lock() {
            *cached = Some((Instant::now(), addrs.clone()));
        }
        Ok(addrs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn internal_and_own_addresses_are_refused_unless_allowed() {
        let policy = EgressPolicy::default();
        for internal in [
            "10.201.0.2",
            "127.0.0.1",
            "127.9.9.9",
            "169.254.169.254",
            "172.16.5.4",
            "192.168.1.1",
            "100.64.0.1",
            "0.0.0.0",
            "224.0.0.1",
            "::1",
            "::",
            "fe80::1",
            "fd00::1",
            "::ffff:127.0.0.1",
            "::ffff:10.0.0.1",
            "64:ff9b::a9fe:a9fe",
        ] {
            assert!(policy.check(ip(internal)).is_err(), "{internal} allowed");
        }
        for public in ["93.184.216.34", "8.8.8.8", "2606:4700::1111"] {
            assert_eq!(policy.check(ip(public)), Ok(()), "{public}");
        }
        let opened = EgressPolicy::new(vec![
            "127.0.0.2/32".parse().unwrap(),
            "10.9.0.0/16".parse().unwrap(),
        ]);
        assert_eq!(opened.check(ip("127.0.0.2")), Ok(()));
        assert_eq!(opened.check(ip("10.9.3.4")), Ok(()));
        assert!(opened.check(ip("127.0.0.1")).is_err());
        assert!(opened.check(ip("10.10.0.1")).is_err());
    }

    #[test]
    fn cidrs_parse_strictly() {
        assert_eq!(
            "10.0.0.0/8".parse::<Cidr>().unwrap().to_string(),
            "10.0.0.0/8"
        );
        assert_eq!("::1".parse::<Cidr>().unwrap().to_string(), "::1/128");
        assert!("0.0.0.0/0".parse::<Cidr>().unwrap().contains(ip("1.2.3.4")));
        for bad in ["10.0.0.0/33", "x/8", "10.0.0.0/", "::/129"] {
            assert!(bad.parse::<Cidr>().is_err(), "{bad}");
        }
    }

    #[tokio::test]
    async fn a_name_is_refused_if_any_of_its_addresses_is() {
        let policy = EgressPolicy::default();
        let local = UpstreamUrl::parse("http://localhost:8000").unwrap();
        let e = policy.resolve(&local).await.unwrap_err();
        assert!(
            e.contains("loopback") && e.contains("--external-allow"),
            "{e}"
        );
        let literal = UpstreamUrl::parse("http://169.254.169.254/latest").unwrap();
        assert!(policy.resolve(&literal).await.is_err());
    }
}
