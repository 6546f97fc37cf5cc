//! The container's veth pair: host end on the bridge, `eth0` in the container.

use std::fs::File;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::os::fd::AsRawFd as _;

use rtnetlink::packet_route::link::{InfoData, InfoVeth};
use rtnetlink::{LinkMessageBuilder, LinkUnspec, LinkVeth};

use super::NetworkError;
use super::netlink::Netlink;

/// Name of the veth end inside the container.
pub const CONTAINER_IFNAME: &str = crate::config::DEFAULT_IFNAME;

const HOST_PREFIX: &str = "netnsv0-";

/// The host end's name, `netnsv0-<pid>`. Linux pids stay below 2^22 (7 digits), so
/// this fits IFNAMSIZ (15 bytes); a larger pid would not, and gets `nsv<hex pid>`
/// (at most 11 bytes) instead of a silently truncated, possibly colliding name.
pub fn host_veth_name(pid: u32) -> String {
    let name = format!("{HOST_PREFIX}{pid}");
    if name.len() <= 15 {
        name
    } else {
        format!("nsv{pid:x}")
    }
}

/// The host end of a CNI attachment, `netnsv0-c<6 hex>`: a hash of the attachment's
/// key (container id and interface name), `attempt` picking another one when a name
/// is taken. The `c` keeps it apart from every pid name.
pub fn cni_host_veth_name(key: &str, attempt: u32) -> String {
    // Stable across builds: nobody needs to recompute the name, but a deterministic
    // first choice keeps names readable in logs across retries.
    let h = netns_common::fnv1a(key.bytes().chain(attempt.to_le_bytes()));
    format!("{HOST_PREFIX}c{:06x}", h & 0xff_ffff)
}

/// Could `name` be a host end [`host_veth_name`] or [`cni_host_veth_name`] made?
pub fn is_host_veth_name(name: &str) -> bool {
    if let Some(rest) = name.strip_prefix(HOST_PREFIX) {
        if let Some(h) = rest.strip_prefix('c') {
            return h.len() == 6 && h.bytes().all(|b| b.is_ascii_hexdigit());
        }
        return !rest.is_empty() && rest.bytes().all(|b| b.is_ascii_digit());
    }
    name.strip_prefix("nsv")
        .is_some_and(|h| !h.is_empty() && h.len() <= 8 && h.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// Creates the pair with the peer (`ifname`) made directly inside the container's
/// namespace (`ns`), so it never appears on the host. Returns the host end's ifindex.
pub async fn create(
    host: &Netlink,
    host_name: &str,
    ifname: &str,
    ns: &File,
    mtu: u32,
) -> Result<u32, NetworkError> {
    let peer = LinkUnspec::new_with_name(ifname)
        .mtu(mtu)
        .setns_by_fd(ns.as_raw_fd())
        .build();
    let msg = LinkMessageBuilder::<LinkVeth>::new(host_name, ifname)
        .set_info_data(InfoData::Veth(InfoVeth::Peer(peer)))
        .mtu(mtu)
        .build();
    host.add_link(
        msg,
        &format!("creating veth {host_name} with peer {ifname} in the container's namespace"),
    )
    .await?;
    let link = host
        .link_by_name(host_name)
        .await?
        .ok_or_else(|| NetworkError::Vanished(host_name.to_owned()))?;
    Ok(link.index)
}

/// Enslaves the host end to the bridge and brings it up.
pub async fn attach_host_end(
    host: &Netlink,
    index: u32,
    bridge_index: u32,
) -> Result<(), NetworkError> {
    Ok(host.set_link(index, true, None, Some(bridge_index)).await?)
}

/// The container's IPv6: address, prefix length, gateway.
pub type Addr6 = (Ipv6Addr, u8, Ipv6Addr);

/// Inside the container: `lo` and `ifname` up, `ip/prefix` on it, default route via
/// `gateway`, and with `v6` its IPv6 address (nodad) and IPv6 default route. Returns
/// its MAC address, read back from the kernel.
pub async fn configure_container(
    ns: &Netlink,
    ifname: &str,
    ip: Ipv4Addr,
    prefix_len: u8,
    gateway: Ipv4Addr,
    v6: Option<Addr6>,
) -> Result<[u8; 6], NetworkError> {
    if let Some(lo) = ns.link_by_name("lo").await?
        && !lo.up
    {
        ns.set_link(lo.index, true, None, None).await?;
    }
    let link = ns
        .link_by_name(ifname)
        .await?
        .ok_or_else(|| NetworkError::Vanished(ifname.to_owned()))?;
    ns.ensure_ipv4_addr(link.index, ip, prefix_len).await?;
    if let Some((ip6, len6, _)) = v6 {
        // Before the link goes up: the address must be usable, not tentative, when the
        // container's process starts.
        ns.ensure_ipv6_addr(link.index, ip6, len6).await?;
    }
    ns.set_link(link.index, true, None, None).await?;
    ns.add_default_route(gateway.into()).await?;
    if let Some((_, _, gw6)) = v6 {
        ns.add_default_route(gw6.into()).await?;
    }
    let link = ns
        .link_by_name(ifname)
        .await?
        .ok_or_else(|| NetworkError::Vanished(ifname.to_owned()))?;
    link.mac
        .ok_or_else(|| NetworkError::NoMac(ifname.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_names_fit_ifnamsiz() {
        assert_eq!(host_veth_name(4370), "netnsv0-4370");
        // PID_MAX_LIMIT is 4194304.
        assert_eq!(host_veth_name(4_194_304), "netnsv0-4194304");
        assert!(host_veth_name(4_194_304).len() <= 15);
        assert_eq!(host_veth_name(u32::MAX), "nsvffffffff");
        let c = cni_host_veth_name("abc:eth0", 0);
        assert!(c.len() <= 15 && c.starts_with("netnsv0-c"), "{c}");
        // Pinned: a name must not change across releases (DEL finds veths by it).
        assert_eq!(c, "netnsv0-ce4a15a");
        assert_ne!(c, cni_host_veth_name("abc:eth0", 1));
        for n in ["netnsv0-4370", "nsvffffffff", &host_veth_name(7), &c] {
            assert!(is_host_veth_name(n), "{n}");
        }
        for n in [
            "netnsv0-",
            "netnsv0-12a",
            "netnsv0-c12",
            "netnsv0-cxyzxyz",
            "netns0",
            "eth0",
            "nsv",
            "nsvxyz",
            "veth123",
        ] {
            assert!(!is_host_veth_name(n), "{n}");
        }
    }
}
