//! Making a tenant's VXLAN interface, over rtnetlink directly: the one
//! attribute it needs that this host's `ip` (iproute2 6.1) cannot set is
//! `nolocalbypass` (Linux 6.6+). With local bypass — the kernel's default
//! — a frame for an endpoint whose address is this host's own is handed
//! to a local VXLAN interface of the same VNI and port, or dropped when
//! there is none. Frames for other sites go to this agent's sealer on
//! loopback, and nodes sharing a host are each other's local addresses:
//! both must leave as UDP.
//!
//! Every value in the request is typed (VNI, address, port, MAC, a name
//! the agent made): nothing a tenant sends reaches it.

use std::net::Ipv4Addr;

use rustix::net::netlink::SocketAddrNetlink;
use rustix::net::{AddressFamily, RecvFlags, SendFlags, SocketType};

const RTM_NEWLINK: u16 = 16;
const NLMSG_ERROR: u16 = 2;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_EXCL: u16 = 0x200;
const NLM_F_CREATE: u16 = 0x400;
const NLA_F_NESTED: u16 = 0x8000;

const IFLA_ADDRESS: u16 = 1;
const IFLA_MTU: u16 = 4;
const IFLA_IFNAME: u16 = 3;
const IFLA_LINKINFO: u16 = 18;
const IFLA_INFO_KIND: u16 = 1;
const IFLA_INFO_DATA: u16 = 2;
const IFLA_VXLAN_ID: u16 = 1;
const IFLA_VXLAN_LOCAL: u16 = 4;
const IFLA_VXLAN_LEARNING: u16 = 7;
const IFLA_VXLAN_PORT: u16 = 15;
const IFLA_VXLAN_LOCALBYPASS: u16 = 31;

/// A VXLAN interface as the agent makes it: no learning (forwarding
/// entries are installed, never learned from what arrives), no local
/// bypass.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Vxlan {
    pub name: String,
    pub vni: u32,
    /// The node's underlay address: the source of what it sends.
    pub local: Ipv4Addr,
    /// The UDP port it receives on (and sends to, unless an entry says).
    pub port: u16,
    pub mac: [u8; 6],
    pub mtu: u32,
}

fn attr(out: &mut Vec<u8>, kind: u16, payload: &[u8]) {
    let len = 4 + payload.len();
    out.extend_from_slice(&(len as u16).to_ne_bytes());
    out.extend_from_slice(&kind.to_ne_bytes());
    out.extend_from_slice(payload);
    out.resize(out.len().next_multiple_of(4), 0);
}

fn nested(out: &mut Vec<u8>, kind: u16, inner: impl FnOnce(&mut Vec<u8>)) {
    let start = out.len();
    out.extend_from_slice(&[0; 4]);
    inner(out);
    let len = (out.len() - start) as u16;
    out[start..start + 2].copy_from_slice(&len.to_ne_bytes());
    out[start + 2..start + 4].copy_from_slice(&(kind | NLA_F_NESTED).to_ne_bytes());
}

/// The `RTM_NEWLINK` request that makes `v` (sequence number `seq`).
pub fn new_link_request(v: &Vxlan, seq: u32) -> Vec<u8> {
    let mut m = vec![0u8; 16];
    // struct ifinfomsg: family, pad, type, index, flags, change: all zero.
    m.extend_from_slice(&[0u8; 16]);
    let mut name = v.name.as_bytes().to_vec();
    name.push(0);
    attr(&mut m, IFLA_IFNAME, &name);
    attr(&mut m, IFLA_ADDRESS, &v.mac);
    attr(&mut m, IFLA_MTU, &v.mtu.to_ne_bytes());
    nested(&mut m, IFLA_LINKINFO, |m| {
        attr(m, IFLA_INFO_KIND, b"vxlan\0");
        nested(m, IFLA_INFO_DATA, |m| {
            attr(m, IFLA_VXLAN_ID, &v.vni.to_ne_bytes());
            attr(m, IFLA_VXLAN_LOCAL, &v.local.octets());
            attr(m, IFLA_VXLAN_PORT, &v.port.to_be_bytes());
            attr(m, IFLA_VXLAN_LEARNING, &[0]);
            attr(m, IFLA_VXLAN_LOCALBYPASS, &[0]);
        });
    });
    let len = m.len() as u32;
    m[0..4].copy_from_slice(&len.to_ne_bytes());
    m[4..6].copy_from_slice(&RTM_NEWLINK.to_ne_bytes());
    let flags = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL;
    m[6..8].copy_from_slice(&flags.to_ne_bytes());
    m[8..12].copy_from_slice(&seq.to_ne_bytes());
    m
}

/// The kernel's answer to request `seq`: `Ok` for its ack, the errno it
/// refused with, or `None` when `reply` is not that answer.
pub fn ack_of(reply: &[u8], seq: u32) -> Option<Result<(), i32>> {
    let u16_at = |i: usize| Some(u16::from_ne_bytes(reply.get(i..i + 2)?.try_into().ok()?));
    let u32_at = |i: usize| Some(u32::from_ne_bytes(reply.get(i..i + 4)?.try_into().ok()?));
    if u16_at(4)? != NLMSG_ERROR || u32_at(8)? != seq {
        return None;
    }
    let error = i32::from_ne_bytes(reply.get(16..20)?.try_into().ok()?);
    Some(if error == 0 { Ok(()) } else { Err(-error) })
}

/// Makes `v` in the agent's own network namespace (the underlay, where
/// its UDP socket stays when the interface moves into a tenant's).
pub fn create(v: &Vxlan) -> std::io::Result<()> {
    let fd = rustix::net::socket(AddressFamily::NETLINK, SocketType::RAW, None)?;
    let seq = 1;
    rustix::net::sendto(
        &fd,
        &new_link_request(v, seq),
        SendFlags::empty(),
        &SocketAddrNetlink::new(0, 0),
    )?;
    let mut buf = vec![0u8; 8192];
    loop {
        let (n, _) = rustix::net::recv(&fd, &mut buf[..], RecvFlags::empty())?;
        match ack_of(&buf[..n], seq) {
            Some(Ok(())) => return Ok(()),
            Some(Err(errno)) => return Err(std::io::Error::from_raw_os_error(errno)),
            None => continue,
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn vxlan() -> Vxlan {
        Vxlan {
            name: "at7x3".into(),
            vni: 0x0001_0203,
            local: Ipv4Addr::new(10, 0, 0, 5),
            port: 4789,
            mac: [2, 0xa7, 0, 0, 0, 3],
            mtu: 1400,
        }
    }

    #[test]
    fn the_request_carries_the_interface_as_typed() {
        let m = new_link_request(&vxlan(), 9);
        assert_eq!(
            u32::from_ne_bytes(m[0..4].try_into().unwrap()) as usize,
            m.len()
        );
        assert_eq!(m.len() % 4, 0);
        let find = |needle: &[u8]| m.windows(needle.len()).any(|w| w == needle);
        assert!(find(b"at7x3\0"));
        assert!(find(b"vxlan\0"));
        // VNI, local address, port (network order), no learning, no bypass.
        assert!(find(&[8, 0, 1, 0, 3, 2, 1, 0]));
        assert!(find(&[8, 0, 4, 0, 10, 0, 0, 5]));
        assert!(find(&[6, 0, 15, 0, 0x12, 0xb5, 0, 0]));
        assert!(find(&[5, 0, 7, 0, 0, 0, 0, 0]));
        assert!(find(&[5, 0, 31, 0, 0, 0, 0, 0]));
        assert!(find(&[8, 0, 4, 0, 0x78, 5, 0, 0]), "MTU 1400");
    }

    #[test]
    fn acks_and_refusals_are_told_apart() {
        let reply = |seq: u32, error: i32| {
            let mut r = vec![0u8; 36];
            r[0..4].copy_from_slice(&36u32.to_ne_bytes());
            r[4..6].copy_from_slice(&NLMSG_ERROR.to_ne_bytes());
            r[8..12].copy_from_slice(&seq.to_ne_bytes());
            r[16..20].copy_from_slice(&error.to_ne_bytes());
            r
        };
        assert_eq!(ack_of(&reply(4, 0), 4), Some(Ok(())));
        assert_eq!(ack_of(&reply(4, -17), 4), Some(Err(17)));
        assert_eq!(ack_of(&reply(5, 0), 4), None);
        assert_eq!(ack_of(&[1, 2, 3], 4), None);
    }

    /// Two "nodes" on this host (ports 47891 and 47892 on loopback
    /// addresses), each interface moved into a namespace of its own: a
    /// ping crosses, as UDP on the loopback (no local bypass).
    #[test]
    fn two_nodes_on_one_host_reach_each_other_as_udp() {
        if !rustix::process::geteuid().is_root() {
            eprintln!("not root: the kernel half of this test needs it");
            return;
        }
        let sh = |cmd: &str| {
            let out = std::process::Command::new("sh")
                .arg("-c")
                .arg(cmd)
                .output()
                .unwrap();
            (
                out.status.success(),
                String::from_utf8_lossy(&out.stderr).into_owned(),
            )
        };
        let cleanup = || {
            sh(
                "ip netns del atxtest1 2>/dev/null; ip netns del atxtest2 2>/dev/null; \
                ip link del atxt1 2>/dev/null; ip link del atxt2 2>/dev/null",
            );
        };
        cleanup();
        for (i, peer) in [(1u8, 2u8), (2, 1)] {
            create(&Vxlan {
                name: format!("atxt{i}"),
                vni: 4242,
                local: Ipv4Addr::new(127, 0, 9, i),
                port: 47890 + u16::from(i),
                mac: [2, 0xa7, 0, 0, 9, i],
                mtu: 1400,
            })
            .unwrap();
            let script = format!(
                "ip netns add atxtest{i} && ip link set atxt{i} netns atxtest{i} && \
                 ip -n atxtest{i} addr add 100.64.9.{i}/10 dev atxt{i} && \
                 ip -n atxtest{i} link set atxt{i} up && \
                 ip netns exec atxtest{i} bridge fdb replace 02:a7:00:00:09:0{peer} dev atxt{i} \
                   dst 127.0.9.{peer} port 4789{peer} self permanent && \
                 ip -n atxtest{i} neigh replace 100.64.9.{peer} lladdr 02:a7:00:00:09:0{peer} \
                   dev atxt{i} nud permanent"
            );
            let (ok, err) = sh(&script);
            assert!(ok, "{err}");
        }
        let (ok, err) = sh("ip netns exec atxtest1 /bin/busybox ping -c 1 -W 2 100.64.9.2");
        cleanup();
        assert!(ok, "no answer across the two interfaces: {err}");
    }
}
