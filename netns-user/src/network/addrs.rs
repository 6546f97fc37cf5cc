//! The host's own IPv4 and IPv6 addresses and the interface each one is on: a port forward with
//! a host IP matches only packets arriving on that interface, so 127.0.0.1 or an
//! internal address is never reachable through the uplink.

use std::collections::HashMap;
use std::net::{Ipv4Addr, Ipv6Addr};

use netns_common::LOOPBACK_IFINDEX;

use super::{Netlink, NetworkError};

/// Address -> ifindex of the hook's network namespace.
#[derive(Debug, Clone, Default)]
pub struct LocalAddrs {
    by_ip: HashMap<Ipv4Addr, u32>,
    by_ip6: HashMap<Ipv6Addr, u32>,
}

impl LocalAddrs {
    /// Reads them over netlink. Runs on a thread of its own so that callers inside the
    /// hook's runtime and plain synchronous callers alike can use it (a runtime cannot
    /// be started inside another); the thread shares this namespace.
    pub fn read() -> Result<LocalAddrs, NetworkError> {
        std::thread::scope(|s| {
            s.spawn(|| {
                super::runtime()?.block_on(async {
                    let (v4, v6) = Netlink::current()?.all_addrs().await?;
                    let mut a = LocalAddrs::from_pairs(v4);
                    a.add_ipv6(v6);
                    Ok(a)
                })
            })
            .join()
            .expect("address listing thread panicked")
        })
    }

    /// From (ifindex, address) pairs. An address on two interfaces keeps the lower
    /// ifindex, so the choice does not depend on listing order.
    pub fn from_pairs(pairs: impl IntoIterator<Item = (u32, Ipv4Addr)>) -> LocalAddrs {
        let mut a = LocalAddrs::default();
        add_lowest(&mut a.by_ip, pairs);
        a
    }

    /// Adds (ifindex, IPv6 address) pairs, as [`LocalAddrs::from_pairs`].
    pub fn add_ipv6(&mut self, pairs: impl IntoIterator<Item = (u32, Ipv6Addr)>) {
        add_lowest(&mut self.by_ip6, pairs);
    }

    /// [`LocalAddrs::ifindex`] for an IPv6 host IP (`::1` is `lo`).
    pub fn ifindex6(&self, host_ip: Option<Ipv6Addr>) -> Option<u32> {
        match host_ip {
            None => Some(0),
            Some(ip) if ip.is_loopback() => Some(LOOPBACK_IFINDEX),
            Some(ip) => self.by_ip6.get(&ip).copied(),
        }
    }

    /// The `PortTarget::ifindex` of a mapping's host IP: 0 for a wildcard, `lo` for all
    /// of 127.0.0.0/8 (the kernel routes the whole block to `lo`, whatever address it
    /// carries), else the interface holding the address; None if it is not local.
    pub fn ifindex(&self, host_ip: Option<Ipv4Addr>) -> Option<u32> {
        match host_ip {
            None => Some(0),
            Some(ip) if ip.is_loopback() => Some(LOOPBACK_IFINDEX),
            Some(ip) => self.by_ip.get(&ip).copied(),
        }
    }
}

/// Records each address's interface, the lower ifindex when it is on several.
fn add_lowest<A: std::hash::Hash + Eq>(
    by_ip: &mut HashMap<A, u32>,
    pairs: impl IntoIterator<Item = (u32, A)>,
) {
    for (idx, ip) in pairs {
        by_ip
            .entry(ip)
            .and_modify(|i| *i = (*i).min(idx))
            .or_insert(idx);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_ip_to_ifindex() {
        let a = LocalAddrs::from_pairs([
            (1, Ipv4Addr::LOCALHOST),
            (7, Ipv4Addr::new(198, 51, 100, 2)),
            (9, Ipv4Addr::new(10, 0, 0, 1)),
            (4, Ipv4Addr::new(10, 0, 0, 1)),
        ]);
        assert_eq!(a.ifindex(None), Some(0));
        assert_eq!(a.ifindex(Some(Ipv4Addr::LOCALHOST)), Some(LOOPBACK_IFINDEX));
        assert_eq!(
            a.ifindex(Some(Ipv4Addr::new(127, 0, 0, 53))),
            Some(LOOPBACK_IFINDEX)
        );
        assert_eq!(a.ifindex(Some(Ipv4Addr::new(198, 51, 100, 2))), Some(7));
        assert_eq!(a.ifindex(Some(Ipv4Addr::new(10, 0, 0, 1))), Some(4));
        assert_eq!(a.ifindex(Some(Ipv4Addr::new(192, 0, 2, 1))), None);
        let mut a = a;
        let up: Ipv6Addr = "2001:db8:100::2".parse().unwrap();
        a.add_ipv6([(7, up)]);
        assert_eq!(a.ifindex6(None), Some(0));
        assert_eq!(
            a.ifindex6(Some(Ipv6Addr::LOCALHOST)),
            Some(LOOPBACK_IFINDEX)
        );
        assert_eq!(a.ifindex6(Some(up)), Some(7));
        assert_eq!(a.ifindex6(Some("2001:db8::9".parse().unwrap())), None);
    }
}
