//! The container's veth pair: host end on the bridge, `eth0` in the container.

use std::fs::File;
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd as _;

use rtnetlink::packet_route::link::{InfoData, InfoVeth};
use rtnetlink::{LinkMessageBuilder, LinkUnspec, LinkVeth};

use super::NetworkError;
use super::netlink::Netlink;

/// Name of the veth end inside the container.
pub const CONTAINER_IFNAME: &str = "eth0";

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

/// Could `name` be a host end [`host_veth_name`] made (for any pid)?
pub fn is_host_veth_name(name: &str) -> bool {
    if let Some(pid) = name.strip_prefix(HOST_PREFIX) {
        return !pid.is_empty() && pid.bytes().all(|b| b.is_ascii_digit());
    }
    name.strip_prefix("nsv")
        .is_some_and(|h| !h.is_empty() && h.len() <= 8 && h.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// Creates the pair with the peer made directly inside the container's namespace
/// (`ns`, an open `/proc/<pid>/ns/net`), so `eth0` never appears on the host.
/// Returns the host end's ifindex.
pub async fn create(
    host: &Netlink,
    host_name: &str,
    ns: &File,
    mtu: u32,
) -> Result<u32, NetworkError> {
    let peer = LinkUnspec::new_with_name(CONTAINER_IFNAME)
        .mtu(mtu)
        .setns_by_fd(ns.as_raw_fd())
        .build();
    let msg = LinkMessageBuilder::<LinkVeth>::new(host_name, CONTAINER_IFNAME)
        .set_info_data(InfoData::Veth(InfoVeth::Peer(peer)))
        .mtu(mtu)
        .build();
    host.add_link(
        msg,
        &format!(
            "creating veth {host_name} with peer {CONTAINER_IFNAME} in the container's namespace"
        ),
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

/// Inside the container: `lo` and `eth0` up, `ip/prefix` on eth0, default route via
/// `gateway`. Returns eth0's MAC address, read back from the kernel.
pub async fn configure_container(
    ns: &Netlink,
    ip: Ipv4Addr,
    prefix_len: u8,
    gateway: Ipv4Addr,
) -> Result<[u8; 6], NetworkError> {
    if let Some(lo) = ns.link_by_name("lo").await?
        && !lo.up
    {
        ns.set_link(lo.index, true, None, None).await?;
    }
    let eth0 = ns
        .link_by_name(CONTAINER_IFNAME)
        .await?
        .ok_or_else(|| NetworkError::Vanished(CONTAINER_IFNAME.to_owned()))?;
    ns.ensure_ipv4_addr(eth0.index, ip, prefix_len).await?;
    ns.set_link(eth0.index, true, None, None).await?;
    ns.add_default_route(gateway).await?;
    let eth0 = ns
        .link_by_name(CONTAINER_IFNAME)
        .await?
        .ok_or_else(|| NetworkError::Vanished(CONTAINER_IFNAME.to_owned()))?;
    eth0.mac.ok_or(NetworkError::NoMac(CONTAINER_IFNAME))
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
        for n in ["netnsv0-4370", "nsvffffffff", &host_veth_name(7)] {
            assert!(is_host_veth_name(n), "{n}");
        }
        for n in [
            "netnsv0-",
            "netnsv0-12a",
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
