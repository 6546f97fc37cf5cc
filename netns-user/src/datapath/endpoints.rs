//! `NETNS_EPS` (container address -> its bridge port and MAC), `NETNS_EPS6` (the same
//! for IPv6 addresses) and `NETNS_BRPORTS` (bridge port -> what may leave the container
//! through it).

use std::net::{Ipv4Addr, Ipv6Addr};

use netns_common::In6;

use aya::maps::{HashMap, MapData};
use netns_common::maps;

use super::{Datapath, DatapathError, absent_ok, hash_entries, key_count, map_err};

/// A container on the bridge: the ifindex of its host veth and its eth0 MAC (the map
/// value itself: neither field has a byte order).
pub use netns_common::Endpoint;

/// What may leave a container through its bridge port: its addresses and MAC.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct BridgePort {
    pub ip: Ipv4Addr,
    /// None: the container has no IPv6, every IPv6 frame from it is dropped.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ip6: Option<Ipv6Addr>,
    pub mac: [u8; 6],
}

impl BridgePort {
    /// The entry of the container `ip` (and `ip6`) with endpoint `ep`.
    pub fn of(ip: Ipv4Addr, ip6: Option<Ipv6Addr>, ep: &Endpoint) -> BridgePort {
        BridgePort {
            ip,
            ip6,
            mac: ep.mac,
        }
    }

    fn to_raw(self) -> netns_common::BridgePort {
        netns_common::BridgePort {
            addr: u32::from(self.ip).to_be(),
            mac: self.mac,
            _pad: [0; 2],
            addr6: self.ip6.map_or(In6::ZERO, |a| In6::from_octets(a.octets())),
        }
    }

    fn from_raw(p: &netns_common::BridgePort) -> BridgePort {
        BridgePort {
            ip: Ipv4Addr::from(u32::from_be(p.addr)),
            ip6: (!p.addr6.is_zero()).then(|| Ipv6Addr::from(p.addr6.octets())),
            mac: p.mac,
        }
    }
}

/// The IPv6 endpoint map (the same values as [`Endpoints`]).
pub struct Endpoints6(HashMap<MapData, In6, Endpoint>);

fn ip6_key(ip: Ipv6Addr) -> In6 {
    In6::from_octets(ip.octets())
}

impl Endpoints6 {
    pub fn insert(&mut self, ip: Ipv6Addr, ep: Endpoint) -> Result<(), DatapathError> {
        self.0
            .insert(ip6_key(ip), ep, 0)
            .map_err(map_err(format!("registering endpoint {ip}")))
    }

    /// Removes an endpoint; false if there was none.
    pub fn remove(&mut self, ip: Ipv6Addr) -> Result<bool, DatapathError> {
        Ok(absent_ok(
            self.0.remove(&ip6_key(ip)),
            format!("removing endpoint {ip}"),
        )?
        .is_some())
    }

    pub fn list(&self) -> Result<Vec<(Ipv6Addr, Endpoint)>, DatapathError> {
        Ok(hash_entries(&self.0, "reading the IPv6 endpoint map")?
            .into_iter()
            .map(|(k, ep)| (Ipv6Addr::from(k.octets()), ep))
            .collect())
    }

    pub fn len(&self) -> usize {
        key_count(&self.0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn ip_key(ip: Ipv4Addr) -> u32 {
    u32::from(ip).to_be()
}

/// The endpoint map.
pub struct Endpoints(HashMap<MapData, u32, Endpoint>);

impl Endpoints {
    pub fn get(&self, ip: Ipv4Addr) -> Result<Option<Endpoint>, DatapathError> {
        absent_ok(self.0.get(&ip_key(ip), 0), format!("reading endpoint {ip}"))
    }

    pub fn insert(&mut self, ip: Ipv4Addr, ep: Endpoint) -> Result<(), DatapathError> {
        self.0
            .insert(ip_key(ip), ep, 0)
            .map_err(map_err(format!("registering endpoint {ip}")))
    }

    /// Removes an endpoint; false if there was none.
    pub fn remove(&mut self, ip: Ipv4Addr) -> Result<bool, DatapathError> {
        Ok(absent_ok(
            self.0.remove(&ip_key(ip)),
            format!("removing endpoint {ip}"),
        )?
        .is_some())
    }

    /// Every endpoint (an entry deleted while listing is skipped).
    pub fn list(&self) -> Result<Vec<(Ipv4Addr, Endpoint)>, DatapathError> {
        Ok(hash_entries(&self.0, "reading the endpoint map")?
            .into_iter()
            .map(|(k, ep)| (Ipv4Addr::from(u32::from_be(k)), ep))
            .collect())
    }

    pub fn len(&self) -> usize {
        key_count(&self.0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The bridge-port map.
pub struct BridgePorts(HashMap<MapData, u32, netns_common::BridgePort>);

impl BridgePorts {
    pub fn get(&self, ifindex: u32) -> Result<Option<BridgePort>, DatapathError> {
        Ok(absent_ok(
            self.0.get(&ifindex, 0),
            format!("reading bridge port ifindex {ifindex}"),
        )?
        .map(|p| BridgePort::from_raw(&p)))
    }

    pub fn insert(&mut self, ifindex: u32, port: BridgePort) -> Result<(), DatapathError> {
        self.0
            .insert(ifindex, port.to_raw(), 0)
            .map_err(map_err(format!(
                "registering bridge port ifindex {ifindex}"
            )))
    }

    /// Closes a bridge port; false if it was not open.
    pub fn remove(&mut self, ifindex: u32) -> Result<bool, DatapathError> {
        Ok(absent_ok(
            self.0.remove(&ifindex),
            format!("removing bridge port ifindex {ifindex}"),
        )?
        .is_some())
    }

    pub fn list(&self) -> Result<Vec<(u32, BridgePort)>, DatapathError> {
        Ok(hash_entries(&self.0, "reading the bridge port map")?
            .into_iter()
            .map(|(i, p)| (i, BridgePort::from_raw(&p)))
            .collect())
    }

    pub fn len(&self) -> usize {
        key_count(&self.0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Datapath {
    pub fn endpoints(&self) -> Result<Endpoints, DatapathError> {
        self.hash_map(maps::ENDPOINTS, false, "opening the endpoint map")
            .map(Endpoints)
    }

    pub fn endpoints6(&self) -> Result<Endpoints6, DatapathError> {
        self.hash_map(maps::ENDPOINTS6, false, "opening the IPv6 endpoint map")
            .map(Endpoints6)
    }

    pub fn bridge_ports(&self) -> Result<BridgePorts, DatapathError> {
        self.hash_map(maps::BRIDGE_PORTS, false, "opening the bridge port map")
            .map(BridgePorts)
    }

    /// Registers a container's addresses, then opens its bridge port for frames from
    /// the container's own MAC and addresses (the port program drops everything on a
    /// port without an entry, so nothing passes before the endpoint exists).
    pub fn add_endpoint(
        &mut self,
        ip: Ipv4Addr,
        ip6: Option<Ipv6Addr>,
        ep: Endpoint,
    ) -> Result<(), DatapathError> {
        let mut eps = self.endpoints()?;
        eps.insert(ip, ep)?;
        let rest = || -> Result<(), DatapathError> {
            if let Some(a) = ip6 {
                self.endpoints6()?.insert(a, ep)?;
            }
            self.bridge_ports()?
                .insert(ep.ifindex, BridgePort::of(ip, ip6, &ep))
        };
        if let Err(e) = rest() {
            let mut undo = || -> Result<(), DatapathError> {
                if let Some(a) = ip6 {
                    self.endpoints6()?.remove(a)?;
                }
                eps.remove(ip).map(drop)
            };
            if let Err(u) = undo() {
                log::warn!(
                    "endpoint {ip} left registered after a failed write: {}",
                    crate::error_chain(&u)
                );
            }
            return Err(e);
        }
        Ok(())
    }

    /// Unregisters a container address, closes its bridge port (unless the ifindex
    /// already serves another container) and purges its conntrack entries (no error if
    /// absent).
    pub fn remove_endpoint(&mut self, ip: Ipv4Addr) -> Result<(), DatapathError> {
        let mut eps = self.endpoints()?;
        if let Some(ep) = eps.get(ip)? {
            let mut bp = self.bridge_ports()?;
            if let Some(p) = bp.get(ep.ifindex)?.filter(|p| p.ip == ip) {
                bp.remove(ep.ifindex)?;
                if let Some(a) = p.ip6 {
                    self.endpoints6()?.remove(a)?;
                }
            }
        }
        eps.remove(ip)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bridge_port_byte_order() {
        let p = BridgePort {
            ip: Ipv4Addr::new(172, 19, 0, 2),
            ip6: Some("fd00:19::2".parse().unwrap()),
            mac: [2, 0, 0, 0, 0, 9],
        };
        let raw = p.to_raw();
        // In memory as on the wire: the eBPF side compares it with the packet's bytes.
        assert_eq!(raw.addr.to_ne_bytes(), [172, 19, 0, 2]);
        assert_eq!(raw.mac, p.mac);
        assert_eq!(raw.addr6.octets(), p.ip6.unwrap().octets());
        assert_eq!(ip6_key(p.ip6.unwrap()), raw.addr6);
        assert_eq!(BridgePort::from_raw(&raw), p);
        assert_eq!(ip_key(p.ip).to_ne_bytes(), [172, 19, 0, 2]);
        let ep = Endpoint {
            ifindex: 7,
            mac: p.mac,
            _pad: [0; 2],
            generation: 1,
        };
        assert_eq!(BridgePort::of(p.ip, p.ip6, &ep), p);
        let v4_only = BridgePort { ip6: None, ..p };
        assert!(v4_only.to_raw().addr6.is_zero());
        assert_eq!(BridgePort::from_raw(&v4_only.to_raw()), v4_only);
    }
}
