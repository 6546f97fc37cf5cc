//! rtnetlink 0.24 helpers: one [`Netlink`] handle per network namespace.
//!
//! A netlink socket talks to the namespace it was created in, so a handle for another
//! namespace is made by creating the socket in a short-lived thread that `setns()`s
//! into it; the socket is then driven from the caller's runtime.

use std::fs::File;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::{AsFd as _, FromRawFd as _, IntoRawFd as _};

use futures::TryStreamExt as _;
use nix::sched::{CloneFlags, setns};
use rtnetlink::packet_route::AddressFamily;
use rtnetlink::packet_route::address::{AddressAttribute, AddressFlags, AddressMessage};
use rtnetlink::packet_route::link::{InfoKind, LinkAttribute, LinkFlags, LinkInfo, LinkMessage};
use rtnetlink::packet_route::route::{RouteAttribute, RouteHeader, RouteType};
use rtnetlink::sys::{Socket, TokioSocket, protocols::NETLINK_ROUTE};
use rtnetlink::{Handle, LinkUnspec, RouteMessageBuilder};

#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    #[error("{what}")]
    Request {
        what: String,
        #[source]
        source: io::Error,
    },
    #[error("opening a netlink socket")]
    Socket(#[source] io::Error),
    #[error("entering the network namespace to open a netlink socket there")]
    Setns(#[source] io::Error),
}

impl NetlinkError {
    /// The errno, if the kernel refused the request.
    pub fn errno(&self) -> Option<i32> {
        match self {
            NetlinkError::Request { source, .. } => source.raw_os_error(),
            _ => None,
        }
    }
}

/// Turns rtnetlink's error (whose Display is "Received a netlink error message ...")
/// into the kernel's errno so messages read like `ip`'s.
fn req(what: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> NetlinkError {
    let what = what.into();
    move |e| {
        let source = match e {
            rtnetlink::Error::NetlinkError(m) => m.to_io(),
            other => io::Error::other(other.to_string()),
        };
        NetlinkError::Request { what, source }
    }
}

fn is_errno(e: &rtnetlink::Error, errno: i32) -> bool {
    matches!(e, rtnetlink::Error::NetlinkError(m) if m.raw_code().abs() == errno)
}

/// A link as far as netns cares.
#[derive(Debug, Clone)]
pub struct Link {
    pub index: u32,
    pub name: String,
    pub mtu: Option<u32>,
    pub mac: Option<[u8; 6]>,
    /// `IFLA_INFO_KIND` (bridge, veth, ...); None for physical devices.
    pub kind: Option<String>,
    pub controller: Option<u32>,
    pub up: bool,
}

impl Link {
    fn from_message(m: &LinkMessage) -> Link {
        let mut l = Link {
            index: m.header.index,
            name: String::new(),
            mtu: None,
            mac: None,
            kind: None,
            controller: None,
            up: m.header.flags.contains(LinkFlags::Up),
        };
        for a in &m.attributes {
            match a {
                LinkAttribute::IfName(n) => l.name.clone_from(n),
                LinkAttribute::Mtu(v) => l.mtu = Some(*v),
                LinkAttribute::Address(a) => l.mac = <[u8; 6]>::try_from(a.as_slice()).ok(),
                LinkAttribute::Controller(c) => l.controller = Some(*c),
                LinkAttribute::LinkInfo(infos) => {
                    for i in infos {
                        if let LinkInfo::Kind(k) = i {
                            l.kind = Some(match k {
                                InfoKind::Bridge => "bridge".to_owned(),
                                InfoKind::Veth => "veth".to_owned(),
                                other => other.to_string(),
                            });
                        }
                    }
                }
                _ => {}
            }
        }
        l
    }

    pub fn is_bridge(&self) -> bool {
        self.kind.as_deref() == Some("bridge")
    }
}

/// `aa:bb:cc:dd:ee:ff`.
pub fn format_mac(mac: [u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Parses `aa:bb:cc:dd:ee:ff` (as [`format_mac`] writes it).
pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let bytes: Vec<u8> = s
        .split(':')
        .map(|b| u8::from_str_radix(b, 16).ok().filter(|_| b.len() == 2))
        .collect::<Option<_>>()?;
    bytes.try_into().ok()
}

/// The MAC address of link `index` in the caller's network namespace, None if there is
/// no such link or it has no Ethernet address. Synchronous: the query runs on a thread
/// of its own with its own runtime (as [`super::addrs::LocalAddrs::read`] does), so
/// callers inside the hook's runtime and plain synchronous callers alike can use it.
pub fn link_mac(index: u32) -> Result<Option<[u8; 6]>, NetlinkError> {
    std::thread::scope(|s| {
        s.spawn(|| {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_io()
                .build()
                .map_err(|source| NetlinkError::Request {
                    what: format!("starting a runtime to look up interface index {index}"),
                    source,
                })?;
            rt.block_on(async {
                Ok(Netlink::current()?
                    .link_by_index(index)
                    .await?
                    .and_then(|l| l.mac))
            })
        })
        .join()
        .expect("link lookup thread panicked")
    })
}

/// The local IPv4 address of an address message, None for other families.
fn ipv4_of(m: &AddressMessage) -> Option<Ipv4Addr> {
    if m.header.family != AddressFamily::Inet {
        return None;
    }
    // IFA_LOCAL is the local address; IFA_ADDRESS is the peer on point-to-point links.
    let local = m.attributes.iter().find_map(|a| match a {
        AddressAttribute::Local(IpAddr::V4(v)) => Some(*v),
        _ => None,
    });
    let addr = m.attributes.iter().find_map(|a| match a {
        AddressAttribute::Address(IpAddr::V4(v)) => Some(*v),
        _ => None,
    });
    local.or(addr)
}

/// A global (not link-local) IPv6 address of an address message, with whether it is
/// still tentative or deprecated (not usable as a source yet, or any more).
fn ipv6_of(m: &AddressMessage) -> Option<(Ipv6Addr, bool)> {
    if m.header.family != AddressFamily::Inet6 {
        return None;
    }
    let addr = m.attributes.iter().find_map(|a| match a {
        AddressAttribute::Address(IpAddr::V6(v)) => Some(*v),
        _ => None,
    })?;
    if addr.segments()[0] & 0xffc0 == 0xfe80 || addr.is_loopback() || addr.is_multicast() {
        return None;
    }
    let flags = m
        .attributes
        .iter()
        .find_map(|a| match a {
            AddressAttribute::Flags(f) => Some(*f),
            _ => None,
        })
        .unwrap_or_else(|| AddressFlags::from_bits_retain(u32::from(m.header.flags.bits())));
    let unusable = flags
        .intersects(AddressFlags::Tentative | AddressFlags::Deprecated | AddressFlags::Dadfailed);
    Some((addr, unusable))
}

/// A route-netlink handle bound to one network namespace.
pub struct Netlink {
    handle: Handle,
}

impl Netlink {
    /// A handle for the caller's network namespace. Must run inside a tokio runtime
    /// (the connection is spawned on it).
    pub fn current() -> Result<Netlink, NetlinkError> {
        let sock = Socket::new(NETLINK_ROUTE).map_err(NetlinkError::Socket)?;
        Self::from_socket(sock)
    }

    /// A handle for the network namespace `ns` (an open `/proc/<pid>/ns/net`).
    pub fn in_netns(ns: &File) -> Result<Netlink, NetlinkError> {
        let sock = std::thread::scope(|s| {
            s.spawn(|| -> Result<Socket, NetlinkError> {
                let home = File::open("/proc/thread-self/ns/net").map_err(NetlinkError::Setns)?;
                setns(ns.as_fd(), CloneFlags::CLONE_NEWNET)
                    .map_err(|e| NetlinkError::Setns(e.into()))?;
                let sock = Socket::new(NETLINK_ROUTE).map_err(NetlinkError::Socket);
                // The thread ends right after; restoring anyway keeps it harmless
                // should it ever be reused.
                if let Err(e) = setns(home.as_fd(), CloneFlags::CLONE_NEWNET) {
                    log::warn!("could not return the netlink thread to its namespace: {e}");
                }
                sock
            })
            .join()
            .expect("netlink socket thread panicked")
        })?;
        Self::from_socket(sock)
    }

    fn from_socket(sock: Socket) -> Result<Netlink, NetlinkError> {
        sock.set_non_blocking(true).map_err(NetlinkError::Socket)?;
        // SAFETY: the fd comes from a socket we own and give up here.
        let tokio_sock = unsafe { TokioSocket::from_raw_fd(sock.into_raw_fd()) };
        let (conn, handle, _) = rtnetlink::from_socket(tokio_sock);
        tokio::spawn(conn);
        Ok(Netlink { handle })
    }

    pub fn handle(&self) -> &Handle {
        &self.handle
    }

    /// The link called `name`, None if there is none.
    pub async fn link_by_name(&self, name: &str) -> Result<Option<Link>, NetlinkError> {
        let mut s = self
            .handle
            .link()
            .get()
            .match_name(name.to_owned())
            .execute();
        match s.try_next().await {
            Ok(m) => Ok(m.as_ref().map(Link::from_message)),
            Err(e) if is_errno(&e, libc::ENODEV) => Ok(None),
            Err(e) => Err(req(format!("looking up interface {name}"))(e)),
        }
    }

    pub async fn link_by_index(&self, index: u32) -> Result<Option<Link>, NetlinkError> {
        let mut s = self.handle.link().get().match_index(index).execute();
        match s.try_next().await {
            Ok(m) => Ok(m.as_ref().map(Link::from_message)),
            Err(e) if is_errno(&e, libc::ENODEV) => Ok(None),
            Err(e) => Err(req(format!("looking up interface index {index}"))(e)),
        }
    }

    /// All links.
    pub async fn links(&self) -> Result<Vec<Link>, NetlinkError> {
        let msgs: Vec<LinkMessage> = self
            .handle
            .link()
            .get()
            .execute()
            .try_collect()
            .await
            .map_err(req("listing interfaces"))?;
        Ok(msgs.iter().map(Link::from_message).collect())
    }

    /// Sets some of up/MTU/controller of a link in one request.
    pub async fn set_link(
        &self,
        index: u32,
        up: bool,
        mtu: Option<u32>,
        controller: Option<u32>,
    ) -> Result<(), NetlinkError> {
        let mut b = LinkUnspec::new_with_index(index);
        if up {
            b = b.up();
        }
        if let Some(m) = mtu {
            b = b.mtu(m);
        }
        if let Some(c) = controller {
            b = b.controller(c);
        }
        self.handle
            .link()
            .set(b.build())
            .execute()
            .await
            .map_err(req(format!("configuring interface index {index}")))
    }

    /// Deletes a link; Ok(false) if it was already gone.
    pub async fn del_link(&self, index: u32) -> Result<bool, NetlinkError> {
        match self.handle.link().del(index).execute().await {
            Ok(()) => Ok(true),
            Err(e) if is_errno(&e, libc::ENODEV) => Ok(false),
            Err(e) => Err(req(format!("deleting interface index {index}"))(e)),
        }
    }

    /// Creates a link from a prepared message.
    pub async fn add_link(&self, msg: LinkMessage, what: &str) -> Result<(), NetlinkError> {
        self.handle
            .link()
            .add(msg)
            .execute()
            .await
            .map_err(req(what))
    }

    /// The address messages of link `index`, or of the whole namespace.
    async fn address_messages(
        &self,
        index: Option<u32>,
    ) -> Result<Vec<AddressMessage>, NetlinkError> {
        let mut get = self.handle.address().get();
        if let Some(i) = index {
            get = get.set_link_index_filter(i);
        }
        let what = match index {
            Some(i) => format!("listing addresses of interface index {i}"),
            None => "listing this namespace's addresses".to_owned(),
        };
        let msgs: Vec<AddressMessage> = get.execute().try_collect().await.map_err(req(what))?;
        Ok(msgs
            .into_iter()
            .filter(|m| index.is_none_or(|i| m.header.index == i))
            .collect())
    }

    /// IPv4 addresses with prefix length of a link, in kernel order (primary first).
    pub async fn ipv4_addrs(&self, index: u32) -> Result<Vec<(Ipv4Addr, u8)>, NetlinkError> {
        Ok(self
            .address_messages(Some(index))
            .await?
            .iter()
            .filter_map(|m| ipv4_of(m).map(|a| (a, m.header.prefix_len)))
            .collect())
    }

    /// Global IPv6 addresses of a link with prefix length, usable ones first (kernel
    /// order within each group).
    pub async fn ipv6_addrs(&self, index: u32) -> Result<Vec<(Ipv6Addr, u8)>, NetlinkError> {
        let mut v: Vec<(bool, Ipv6Addr, u8)> = self
            .address_messages(Some(index))
            .await?
            .iter()
            .filter_map(|m| ipv6_of(m).map(|(a, bad)| (bad, a, m.header.prefix_len)))
            .collect();
        v.sort_by_key(|(bad, _, _)| *bad);
        Ok(v.into_iter().map(|(_, a, p)| (a, p)).collect())
    }

    /// Every IPv4 and global IPv6 address of the namespace with the ifindex of its
    /// link (one dump).
    pub async fn all_addrs(
        &self,
    ) -> Result<(Vec<(u32, Ipv4Addr)>, Vec<(u32, Ipv6Addr)>), NetlinkError> {
        let msgs = self.address_messages(None).await?;
        let v4 = msgs
            .iter()
            .filter_map(|m| ipv4_of(m).map(|a| (m.header.index, a)))
            .collect();
        let v6 = msgs
            .iter()
            .filter_map(|m| ipv6_of(m).map(|(a, _)| (m.header.index, a)))
            .collect();
        Ok((v4, v6))
    }

    /// Adds `addr/prefix` to a link unless it is there already.
    pub async fn ensure_ipv4_addr(
        &self,
        index: u32,
        addr: Ipv4Addr,
        prefix: u8,
    ) -> Result<(), NetlinkError> {
        if self.ipv4_addrs(index).await?.contains(&(addr, prefix)) {
            return Ok(());
        }
        self.add_address(index, IpAddr::V4(addr), prefix).await
    }

    /// Adds `addr/prefix` to a link with `nodad` (usable at once: the prefix is ours,
    /// nobody else on the bridge can hold the address) unless it is there already.
    pub async fn ensure_ipv6_addr(
        &self,
        index: u32,
        addr: Ipv6Addr,
        prefix: u8,
    ) -> Result<(), NetlinkError> {
        if self.ipv6_addrs(index).await?.contains(&(addr, prefix)) {
            return Ok(());
        }
        self.add_address(index, IpAddr::V6(addr), prefix).await
    }

    /// Adds an address (an IPv6 one with `nodad`); one that exists already is fine.
    async fn add_address(&self, index: u32, addr: IpAddr, prefix: u8) -> Result<(), NetlinkError> {
        let mut r = self.handle.address().add(index, addr, prefix);
        if addr.is_ipv6() {
            r.message_mut()
                .attributes
                .push(AddressAttribute::Flags(AddressFlags::Nodad));
        }
        match r.execute().await {
            Ok(()) => Ok(()),
            Err(e) if is_errno(&e, libc::EEXIST) => Ok(()),
            Err(e) => Err(req(format!(
                "adding {addr}/{prefix} to interface index {index}"
            ))(e)),
        }
    }

    /// The output interface of the IPv4 default route in the main table (the first
    /// next hop of a multipath route), None if there is no default route.
    pub async fn default_route_ifindex(&self) -> Result<Option<u32>, NetlinkError> {
        let routes: Vec<_> = self
            .handle
            .route()
            .get(RouteMessageBuilder::<Ipv4Addr>::new().build())
            .execute()
            .try_collect()
            .await
            .map_err(req("listing IPv4 routes"))?;
        let mut best: Option<(u32, u32)> = None; // (priority, oif)
        for r in &routes {
            let table = r
                .attributes
                .iter()
                .find_map(|a| match a {
                    RouteAttribute::Table(t) => Some(*t),
                    _ => None,
                })
                .unwrap_or(u32::from(r.header.table));
            if r.header.destination_prefix_length != 0
                || table != u32::from(RouteHeader::RT_TABLE_MAIN)
                || r.header.kind != RouteType::Unicast
            {
                continue;
            }
            let mut oif = None;
            let mut prio = 0;
            for a in &r.attributes {
                match a {
                    RouteAttribute::Oif(i) => oif = Some(*i),
                    RouteAttribute::Priority(p) => prio = *p,
                    RouteAttribute::MultiPath(hops) if oif.is_none() => {
                        oif = hops.first().map(|h| h.interface_index);
                    }
                    _ => {}
                }
            }
            if let Some(o) = oif
                && best.is_none_or(|(p, _)| prio < p)
            {
                best = Some((prio, o));
            }
        }
        Ok(best.map(|(_, o)| o))
    }

    /// Adds `default via gw`, IPv4 or IPv6 (no error if a default route of that
    /// family exists already).
    pub async fn add_default_route(&self, gw: IpAddr) -> Result<(), NetlinkError> {
        let msg = match gw {
            IpAddr::V4(g) => RouteMessageBuilder::<Ipv4Addr>::new().gateway(g).build(),
            IpAddr::V6(g) => RouteMessageBuilder::<Ipv6Addr>::new().gateway(g).build(),
        };
        match self.handle.route().add(msg).execute().await {
            Ok(()) => Ok(()),
            Err(e) if is_errno(&e, libc::EEXIST) => Ok(()),
            Err(e) => Err(req(format!("adding default route via {gw}"))(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macs_round_trip() {
        let mac = [2, 0, 10, 255, 0, 1];
        assert_eq!(parse_mac(&format_mac(mac)), Some(mac));
        for bad in [
            "",
            "02:00:0a:ff:00",
            "02:00:0a:ff:00:01:02",
            "2:00:0a:ff:00:01",
            "zz:00:0a:ff:00:01",
        ] {
            assert_eq!(parse_mac(bad), None, "{bad}");
        }
    }
}
