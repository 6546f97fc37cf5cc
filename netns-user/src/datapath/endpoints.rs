//! `NETNS_EPS` (container address -> its bridge port and MAC) and `NETNS_BRPORTS`
//! (bridge port -> what may leave the container through it).

use std::net::Ipv4Addr;

use aya::maps::{HashMap, MapData};
use netns_common::maps;

use super::{Datapath, DatapathError, absent_ok, hash_entries, key_count, map_err};

/// A container on the bridge: the ifindex of its host veth and its eth0 MAC (the map
/// value itself: neither field has a byte order).
pub use netns_common::Endpoint;

/// What may leave a container through its bridge port: its address and MAC.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct BridgePort {
    pub ip: Ipv4Addr,
    pub mac: [u8; 6],
}

impl BridgePort {
    /// The entry of the container `ip` with endpoint `ep`.
    pub fn of(ip: Ipv4Addr, ep: &Endpoint) -> BridgePort {
        BridgePort { ip, mac: ep.mac }
    }

    fn to_raw(self) -> netns_common::BridgePort {
        netns_common::BridgePort {
            addr: u32::from(self.ip).to_be(),
            mac: self.mac,
            _pad: [0; 2],
            addr6: netns_common::In6::ZERO,
        }
    }

    fn from_raw(p: &netns_common::BridgePort) -> BridgePort {
        BridgePort {
            ip: Ipv4Addr::from(u32::from_be(p.addr)),
            mac: p.mac,
        }
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

    pub fn bridge_ports(&self) -> Result<BridgePorts, DatapathError> {
        self.hash_map(maps::BRIDGE_PORTS, false, "opening the bridge port map")
            .map(BridgePorts)
    }

    /// Registers a container address, then opens its bridge port for frames from the
    /// container's own MAC and address (the port program drops everything on a port
    /// without an entry, so nothing passes before the endpoint exists).
    pub fn add_endpoint(&mut self, ip: Ipv4Addr, ep: Endpoint) -> Result<(), DatapathError> {
        let mut eps = self.endpoints()?;
        eps.insert(ip, ep)?;
        if let Err(e) = self
            .bridge_ports()?
            .insert(ep.ifindex, BridgePort::of(ip, &ep))
        {
            if let Err(u) = eps.remove(ip) {
                log::warn!(
                    "endpoint {ip} left registered after a failed bridge port write: {}",
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
            if bp.get(ep.ifindex)?.is_some_and(|p| p.ip == ip) {
                bp.remove(ep.ifindex)?;
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
            mac: [2, 0, 0, 0, 0, 9],
        };
        let raw = p.to_raw();
        // In memory as on the wire: the eBPF side compares it with the packet's bytes.
        assert_eq!(raw.addr.to_ne_bytes(), [172, 19, 0, 2]);
        assert_eq!(raw.mac, p.mac);
        assert_eq!(BridgePort::from_raw(&raw), p);
        assert_eq!(ip_key(p.ip).to_ne_bytes(), [172, 19, 0, 2]);
        let ep = Endpoint {
            ifindex: 7,
            mac: p.mac,
            _pad: [0; 2],
            generation: 1,
        };
        assert_eq!(BridgePort::of(p.ip, &ep), p);
    }
}
