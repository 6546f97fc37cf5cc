//! Kernel networking: links, addresses and routes over rtnetlink, and sysctls.
//!
//! Async functions take a [`Netlink`] handle and run on a tokio current-thread
//! runtime ([`runtime`]); the `*_blocking` helpers wrap them for callers without one.

pub mod addrs;
pub mod bridge;
pub mod forward_rules;
pub mod netlink;
pub mod portset;
pub mod sysctl;
pub mod veth;

use std::fs::File;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::os::unix::fs::MetadataExt as _;

pub use netlink::{Link, Netlink, NetlinkError, format_mac};

/// MTU used when neither `--mtu` nor an uplink gives one.
pub const DEFAULT_MTU: u32 = 1500;

#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    #[error(transparent)]
    Netlink(#[from] NetlinkError),
    #[error(transparent)]
    Ip6(#[from] crate::config::Ip6Error),
    #[error("{name} exists but is not a bridge (it is {kind}); choose another --bridge")]
    NotABridge { name: String, kind: String },
    #[error("interface {0} disappeared right after it was created or configured")]
    Vanished(String),
    #[error("{0} has no Ethernet address")]
    NoMac(String),
    #[error("no interface named {0}")]
    NoSuchLink(String),
    #[error("uplink {0} (--uplink/NETNS_UPLINK) does not exist in the hook's network namespace")]
    NoUplink(String),
    #[error(
        "no IPv4 default route in this network namespace to pick the uplink from; pass --uplink"
    )]
    NoDefaultRoute,
    #[error("opening the network namespace of pid {pid} ({path})")]
    OpenNetns {
        pid: u32,
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "pid {0} shares the hook's network namespace (no network namespace in config.json?): \
         refusing to add eth0 to the host"
    )]
    SharedNetns(u32),
    #[error(
        "pid {0} is in the network namespace of pid 1 (the machine's own): \
         refusing to add eth0 there"
    )]
    InitNetns(u32),
    #[error("opening the network namespace {path}")]
    OpenNetnsPath {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0} is this process's own network namespace: refusing to add an interface there")]
    SharedNetnsPath(String),
    #[error(
        "{0} is the network namespace of pid 1 (the machine's own): refusing to add an interface there"
    )]
    InitNetnsPath(String),
    #[error("no free host veth name for {0} (64 tried)")]
    NoFreeName(String),
    #[error("{path} is not a network namespace")]
    NotANetns { path: String },
    #[error(
        "the network namespace of pid {pid} already has interfaces ({names}): \
         a container's new namespace holds only lo, so this pid is probably not the container's{}",
        engine_hint(names)
    )]
    NotFresh { pid: u32, names: String },
    #[error("starting the netlink runtime")]
    Runtime(#[source] std::io::Error),
    #[error(transparent)]
    Sysctl(#[from] sysctl::SysctlError),
}

/// A tokio current-thread runtime with the I/O driver netlink sockets need.
pub fn runtime() -> Result<tokio::runtime::Runtime, NetworkError> {
    tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .map_err(NetworkError::Runtime)
}

/// Opens `/proc/<pid>/ns/net` and makes sure it is not the caller's own namespace.
pub fn open_container_netns(pid: u32) -> Result<File, NetworkError> {
    let path = format!("/proc/{pid}/ns/net");
    let open_err = |source| NetworkError::OpenNetns {
        pid,
        path: path.clone(),
        source,
    };
    let f = File::open(&path).map_err(open_err)?;
    let theirs = f.metadata().map_err(open_err)?;
    match foreign_netns(&theirs).map_err(open_err)? {
        Foreign::Yes => Ok(f),
        Foreign::Ours => Err(NetworkError::SharedNetns(pid)),
        Foreign::Init => Err(NetworkError::InitNetns(pid)),
    }
}

enum Foreign {
    Yes,
    Ours,
    Init,
}

/// Is the namespace `theirs` neither ours nor the machine's own (pid 1's, when
/// visible: a caller running in a child namespace must not reach into it either)?
fn foreign_netns(theirs: &std::fs::Metadata) -> std::io::Result<Foreign> {
    let same = |m: &std::fs::Metadata| (theirs.dev(), theirs.ino()) == (m.dev(), m.ino());
    if same(&std::fs::metadata("/proc/self/ns/net")?) {
        return Ok(Foreign::Ours);
    }
    if std::fs::metadata("/proc/1/ns/net").is_ok_and(|m| same(&m)) {
        return Ok(Foreign::Init);
    }
    Ok(Foreign::Yes)
}

/// Opens a network namespace by path (a CNI runtime's `CNI_NETNS`, such as
/// `/var/run/netns/cni-…` or `/proc/<pid>/ns/net`), refusing anything that is not a
/// network namespace, and our own or the machine's own namespace.
pub fn open_netns_path(path: &str) -> Result<File, NetworkError> {
    let open_err = |source| NetworkError::OpenNetnsPath {
        path: path.to_owned(),
        source,
    };
    let f = File::open(path).map_err(open_err)?;
    // NS_GET_NSTYPE (_IO(0xb7, 0x3)) says what kind of namespace a file is.
    const NS_GET_NSTYPE: libc::c_ulong = 0xb703;
    // SAFETY: the ioctl takes no argument and only reads the fd.
    let kind = unsafe { libc::ioctl(std::os::fd::AsRawFd::as_raw_fd(&f), NS_GET_NSTYPE as _) };
    if kind != libc::CLONE_NEWNET {
        return Err(NetworkError::NotANetns {
            path: path.to_owned(),
        });
    }
    let theirs = f.metadata().map_err(open_err)?;
    match foreign_netns(&theirs).map_err(open_err)? {
        Foreign::Yes => Ok(f),
        Foreign::Ours => Err(NetworkError::SharedNetnsPath(path.to_owned())),
        Foreign::Init => Err(NetworkError::InitNetnsPath(path.to_owned())),
    }
}

/// Refuses a namespace with interfaces other than `lo`: the pid is then not a fresh
/// container (a wrong pid must never get eth0, an address and a default route added to
/// some other namespace, such as the machine's own). `allow` names interfaces that a
/// partial earlier setup of this very container may have left.
pub async fn check_fresh_netns(ns: &Netlink, pid: u32, allow: &[&str]) -> Result<(), NetworkError> {
    let others: Vec<String> = ns
        .links()
        .await?
        .into_iter()
        .map(|l| l.name)
        .filter(|n| n != "lo" && !allow.contains(&n.as_str()))
        .collect();
    if others.is_empty() {
        Ok(())
    } else {
        Err(NetworkError::NotFresh {
            pid,
            names: others.join(", "),
        })
    }
}

/// An `eth0` already there is an engine's own network (podman's default, docker's
/// bridge): netns must be the only network of the container.
fn engine_hint(names: &str) -> &'static str {
    if names.split(", ").any(|n| n == "eth0") {
        "; if an engine gave it a network already (podman, docker), run the container with \
         `--network none` so netns is its only network"
    } else {
        ""
    }
}

/// The interface masqueraded traffic leaves through.
#[derive(Debug, Clone)]
pub struct Uplink {
    pub name: String,
    pub index: u32,
    pub mtu: Option<u32>,
    /// First IPv4 address (the masquerade source), None if it has none.
    pub addr: Option<Ipv4Addr>,
    /// First usable global IPv6 address (the NAT66 source), None if it has none.
    pub addr6: Option<Ipv6Addr>,
}

/// Resolves `--uplink` (or the IPv4 default route's device when None).
pub async fn uplink(nl: &Netlink, name: Option<&str>) -> Result<Uplink, NetworkError> {
    let link = match name {
        Some(n) => nl
            .link_by_name(n)
            .await?
            .ok_or_else(|| NetworkError::NoUplink(n.to_owned()))?,
        None => {
            let idx = nl
                .default_route_ifindex()
                .await?
                .ok_or(NetworkError::NoDefaultRoute)?;
            nl.link_by_index(idx)
                .await?
                .ok_or_else(|| NetworkError::NoSuchLink(format!("index {idx}")))?
        }
    };
    let addr = first_ipv4(nl, link.index).await?;
    let addr6 = nl.ipv6_addrs(link.index).await?.first().map(|(a, _)| *a);
    Ok(Uplink {
        name: link.name,
        index: link.index,
        mtu: link.mtu,
        addr,
        addr6,
    })
}

/// The first IPv4 address of a link.
pub async fn first_ipv4(nl: &Netlink, index: u32) -> Result<Option<Ipv4Addr>, NetworkError> {
    Ok(nl.ipv4_addrs(index).await?.first().map(|(a, _)| *a))
}

/// Ifindex of `name` in the current namespace.
pub async fn ifindex(nl: &Netlink, name: &str) -> Result<u32, NetworkError> {
    nl.link_by_name(name)
        .await?
        .map(|l| l.index)
        .ok_or_else(|| NetworkError::NoSuchLink(name.to_owned()))
}

/// MAC of `name` inside the network namespace `ns` (e.g. a container's eth0).
pub async fn mac_in_netns(ns: &File, name: &str) -> Result<[u8; 6], NetworkError> {
    let nl = Netlink::in_netns(ns)?;
    let link = nl
        .link_by_name(name)
        .await?
        .ok_or_else(|| NetworkError::NoSuchLink(name.to_owned()))?;
    link.mac.ok_or_else(|| NetworkError::NoMac(name.to_owned()))
}

/// [`uplink`] for callers without a runtime.
pub fn uplink_blocking(name: Option<&str>) -> Result<Uplink, NetworkError> {
    runtime()?.block_on(async { uplink(&Netlink::current()?, name).await })
}

/// [`ifindex`] for callers without a runtime.
pub fn ifindex_blocking(name: &str) -> Result<u32, NetworkError> {
    runtime()?.block_on(async { ifindex(&Netlink::current()?, name).await })
}

/// [`mac_in_netns`] for callers without a runtime.
pub fn mac_in_netns_blocking(ns: &File, name: &str) -> Result<[u8; 6], NetworkError> {
    runtime()?.block_on(mac_in_netns(ns, name))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_preexisting_eth0_points_at_network_none() {
        let e = NetworkError::NotFresh {
            pid: 7,
            names: "eth0".into(),
        };
        assert!(e.to_string().contains("--network none"), "{e}");
        let e = NetworkError::NotFresh {
            pid: 7,
            names: "wg0, veth9".into(),
        };
        assert!(!e.to_string().contains("--network none"), "{e}");
    }
}
