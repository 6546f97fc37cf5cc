//! `NETNS_PORTS` and `NETNS_PORTS6`: port forwards, `(host IP or any, host port,
//! proto)` -> container address and port, and the interface the host IP is on.

use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddrV4, SocketAddrV6};

use aya::maps::{Array, HashMap, MapData};
use netns_common::{
    IPPROTO_TCP, IPPROTO_UDP, In6, PORT_USE_ROW, Port6Key, Port6Target, PortKey, PortTarget, maps,
    port_use_slot,
};
use serde::{Deserialize, Serialize};

use super::{Datapath, DatapathError, absent_ok, hash_entries, key_count, map_err};

/// The protocols port forwards exist for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Proto {
    Tcp,
    Udp,
}

impl Proto {
    /// The IP protocol number.
    pub fn number(self) -> u8 {
        match self {
            Proto::Tcp => IPPROTO_TCP,
            Proto::Udp => IPPROTO_UDP,
        }
    }

    pub fn from_number(n: u8) -> Option<Proto> {
        match n {
            IPPROTO_TCP => Some(Proto::Tcp),
            IPPROTO_UDP => Some(Proto::Udp),
            _ => None,
        }
    }
}

impl fmt::Display for Proto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(netns_common::proto_name(self.number()).unwrap_or("?"))
    }
}

/// What identifies a port forward: the host side.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct PortForwardKey {
    /// None: every address of the host.
    pub host_ip: Option<Ipv4Addr>,
    pub host_port: u16,
    pub proto: Proto,
}

impl fmt::Display for PortForwardKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.host_ip {
            Some(ip) => write!(f, "{ip}:{}/{}", self.host_port, self.proto),
            None => write!(f, "*:{}/{}", self.host_port, self.proto),
        }
    }
}

/// One port forward, host order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct PortForward {
    pub host_ip: Option<Ipv4Addr>,
    pub host_port: u16,
    pub proto: Proto,
    /// The container address and port.
    pub target: SocketAddrV4,
    /// The interface `host_ip` belongs to: a packet matches only when it arrives there
    /// (0 for a wildcard, [`netns_common::LOOPBACK_IFINDEX`] for 127/8).
    pub ifindex: u32,
    /// The container runtime binds the host port itself (CNI): host binds allowed.
    pub runtime_binds: bool,
}

impl PortForward {
    pub fn key(&self) -> PortForwardKey {
        PortForwardKey {
            host_ip: self.host_ip,
            host_port: self.host_port,
            proto: self.proto,
        }
    }

    fn to_raw(self) -> (PortKey, PortTarget) {
        (
            self.key().to_raw(),
            PortTarget {
                addr: u32::from(*self.target.ip()).to_be(),
                port: self.target.port().to_be(),
                flags: if self.runtime_binds {
                    netns_common::port_flags::RUNTIME_BINDS
                } else {
                    0
                },
                _pad: 0,
                ifindex: self.ifindex,
            },
        )
    }

    /// None for a protocol netns never maps.
    fn from_raw(k: &PortKey, t: &PortTarget) -> Option<PortForward> {
        Some(PortForward {
            host_ip: (k.host_addr != 0).then(|| Ipv4Addr::from(u32::from_be(k.host_addr))),
            host_port: u16::from_be(k.host_port),
            proto: Proto::from_number(k.proto)?,
            target: SocketAddrV4::new(Ipv4Addr::from(u32::from_be(t.addr)), u16::from_be(t.port)),
            ifindex: t.ifindex,
            runtime_binds: t.flags & netns_common::port_flags::RUNTIME_BINDS != 0,
        })
    }
}

impl fmt::Display for PortForward {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} -> {}", self.key(), self.target)
    }
}

impl PortForwardKey {
    fn to_raw(self) -> PortKey {
        PortKey {
            host_addr: self.host_ip.map_or(0, |a| u32::from(a).to_be()),
            host_port: self.host_port.to_be(),
            proto: self.proto.number(),
            _pad: 0,
        }
    }
}

/// The port-forward map, with the port-use table the uplink's programs check first.
pub struct PortForwards(HashMap<MapData, PortKey, PortTarget>, PortUse);

/// `NETNS_PORTUSE`'s port-forward table: host ports outside the NAT range whose
/// packets the uplink must look up (others it passes as the host's before any
/// lookup). Marks are never taken back: a stale one only costs the lookup.
pub struct PortUse {
    map: Array<MapData, [u8; PORT_USE_ROW]>,
    /// Rows as this handle last read or wrote them (a mark seen there is final).
    rows: std::collections::HashMap<u32, [u8; PORT_USE_ROW]>,
}

impl PortUse {
    /// Marks `port` (host order); writes its row only if the mark is new, and then
    /// returns true. A cached mark is final (marks are never taken back); a row without
    /// it is read afresh before the write, so that marks another handle (the IPv4 and
    /// IPv6 maps share the table) made since are kept.
    pub fn mark(&mut self, port: u16) -> Result<bool, DatapathError> {
        let (row, i) = port_use_slot(port);
        if self.rows.get(&row).is_some_and(|r| r[i] != 0) {
            return Ok(false);
        }
        let mut r = self
            .map
            .get(&row, 0)
            .map_err(map_err("reading the port-use table"))?;
        let new = r[i] == 0;
        if new {
            r[i] = 1;
            self.map
                .set(row, r, 0)
                .map_err(map_err(format!("marking host port {port} in use")))?;
        }
        self.rows.insert(row, r);
        Ok(new)
    }

    /// Marks in both tables (a port marked in both counts twice).
    pub fn count(&self) -> Result<usize, DatapathError> {
        let mut n = 0;
        for row in self.map.iter() {
            let r = row.map_err(map_err("reading the port-use table"))?;
            n += r.iter().filter(|b| **b != 0).count();
        }
        Ok(n)
    }
}

impl PortForwards {
    pub fn get(&self, key: PortForwardKey) -> Result<Option<PortForward>, DatapathError> {
        let raw = key.to_raw();
        Ok(
            absent_ok(self.0.get(&raw, 0), format!("reading port forward {key}"))?
                .and_then(|t| PortForward::from_raw(&raw, &t)),
        )
    }

    /// Writes (or overwrites) a forward. Its host port is marked in use first, so that
    /// no packet for it is taken for the host's once the forward is there.
    pub fn insert(&mut self, f: &PortForward) -> Result<(), DatapathError> {
        self.1.mark(f.host_port)?;
        let (k, t) = f.to_raw();
        self.0
            .insert(k, t, 0)
            .map_err(map_err(format!("writing port forward {f}")))
    }

    /// The port-use table.
    pub fn port_use(&self) -> &PortUse {
        &self.1
    }

    /// Removes a forward; false if there was none.
    pub fn remove(&mut self, key: PortForwardKey) -> Result<bool, DatapathError> {
        Ok(absent_ok(
            self.0.remove(&key.to_raw()),
            format!("removing port forward {key}"),
        )?
        .is_some())
    }

    /// Every forward (entries of protocols other than TCP and UDP, which netns never
    /// writes and the programs never look up, are left out).
    pub fn list(&self) -> Result<Vec<PortForward>, DatapathError> {
        Ok(hash_entries(&self.0, "reading the port map")?
            .iter()
            .filter_map(|(k, t)| PortForward::from_raw(k, t))
            .collect())
    }

    pub fn len(&self) -> usize {
        key_count(&self.0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// What identifies an IPv6 port forward: the host side.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct PortForward6Key {
    /// None: every IPv6 address of the host (`[::]`).
    pub host_ip: Option<Ipv6Addr>,
    pub host_port: u16,
    pub proto: Proto,
}

impl fmt::Display for PortForward6Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ip = self.host_ip.unwrap_or(Ipv6Addr::UNSPECIFIED);
        write!(f, "[{ip}]:{}/{}", self.host_port, self.proto)
    }
}

impl PortForward6Key {
    fn to_raw(self) -> Port6Key {
        Port6Key {
            host_addr: self
                .host_ip
                .map_or(In6::ZERO, |a| In6::from_octets(a.octets())),
            host_port: self.host_port.to_be(),
            proto: self.proto.number(),
            _pad: 0,
        }
    }
}

/// One IPv6 port forward, as [`PortForward`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct PortForward6 {
    pub host_ip: Option<Ipv6Addr>,
    pub host_port: u16,
    pub proto: Proto,
    pub target: SocketAddrV6,
    /// As [`PortForward::ifindex`] ([`netns_common::LOOPBACK_IFINDEX`] for `::1`).
    pub ifindex: u32,
    pub runtime_binds: bool,
}

impl PortForward6 {
    pub fn key(&self) -> PortForward6Key {
        PortForward6Key {
            host_ip: self.host_ip,
            host_port: self.host_port,
            proto: self.proto,
        }
    }

    fn to_raw(self) -> (Port6Key, Port6Target) {
        (
            self.key().to_raw(),
            Port6Target {
                addr: In6::from_octets(self.target.ip().octets()),
                port: self.target.port().to_be(),
                flags: if self.runtime_binds {
                    netns_common::port_flags::RUNTIME_BINDS
                } else {
                    0
                },
                _pad: 0,
                ifindex: self.ifindex,
            },
        )
    }

    fn from_raw(k: &Port6Key, t: &Port6Target) -> Option<PortForward6> {
        Some(PortForward6 {
            host_ip: (!k.host_addr.is_zero()).then(|| Ipv6Addr::from(k.host_addr.octets())),
            host_port: u16::from_be(k.host_port),
            proto: Proto::from_number(k.proto)?,
            target: SocketAddrV6::new(Ipv6Addr::from(t.addr.octets()), u16::from_be(t.port), 0, 0),
            ifindex: t.ifindex,
            runtime_binds: t.flags & netns_common::port_flags::RUNTIME_BINDS != 0,
        })
    }
}

impl fmt::Display for PortForward6 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} -> {}", self.key(), self.target)
    }
}

/// The IPv6 port-forward map, with the port-use table (shared with IPv4: a port
/// marked for either family is looked up for both).
pub struct PortForwards6(HashMap<MapData, Port6Key, Port6Target>, PortUse);

impl PortForwards6 {
    /// Writes (or overwrites) a forward, its host port marked in use first.
    pub fn insert(&mut self, f: &PortForward6) -> Result<(), DatapathError> {
        self.1.mark(f.host_port)?;
        let (k, t) = f.to_raw();
        self.0
            .insert(k, t, 0)
            .map_err(map_err(format!("writing port forward {f}")))
    }

    /// Removes a forward; false if there was none.
    pub fn remove(&mut self, key: PortForward6Key) -> Result<bool, DatapathError> {
        Ok(absent_ok(
            self.0.remove(&key.to_raw()),
            format!("removing port forward {key}"),
        )?
        .is_some())
    }

    pub fn list(&self) -> Result<Vec<PortForward6>, DatapathError> {
        Ok(hash_entries(&self.0, "reading the IPv6 port map")?
            .iter()
            .filter_map(|(k, t)| PortForward6::from_raw(k, t))
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
    fn port_use(&self) -> Result<PortUse, DatapathError> {
        let map = Array::try_from(aya::maps::Map::Array(self.map_data(maps::PORT_USE)?))
            .map_err(map_err("opening the port-use table"))?;
        Ok(PortUse {
            map,
            rows: Default::default(),
        })
    }

    pub fn port_forwards(&self) -> Result<PortForwards, DatapathError> {
        Ok(PortForwards(
            self.hash_map(maps::PORTS, false, "opening the port map")?,
            self.port_use()?,
        ))
    }

    /// Marks the port of every forward there is, of both families: programs that pass
    /// unmarked ports may replace ones that did not mark them (an IPv6 forward written
    /// before IPv6 checked the table). Returns the ports newly marked.
    pub fn mark_forward_ports(&self) -> Result<usize, DatapathError> {
        let mut used = self.port_use()?;
        let v4 = self.port_forwards()?.list()?;
        let v6 = self.port_forwards6()?.list()?;
        let mut marked = 0;
        for port in v4
            .iter()
            .map(|f| f.host_port)
            .chain(v6.iter().map(|f| f.host_port))
        {
            marked += usize::from(used.mark(port)?);
        }
        Ok(marked)
    }

    pub fn port_forwards6(&self) -> Result<PortForwards6, DatapathError> {
        Ok(PortForwards6(
            self.hash_map(maps::PORTS6, false, "opening the IPv6 port map")?,
            self.port_use()?,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_forward_byte_order() {
        let f = PortForward {
            host_ip: Some(Ipv4Addr::new(198, 51, 100, 3)),
            host_port: 8080,
            proto: Proto::Udp,
            target: "172.19.0.2:80".parse().unwrap(),
            ifindex: 5,
            runtime_binds: true,
        };
        let (k, t) = f.to_raw();
        // Network order: the bytes in memory are the bytes on the wire.
        assert_eq!(k.host_addr.to_ne_bytes(), [198, 51, 100, 3]);
        assert_eq!(k.host_port.to_ne_bytes(), 8080u16.to_be_bytes());
        assert_eq!(k.proto, IPPROTO_UDP);
        assert_eq!(t.addr.to_ne_bytes(), [172, 19, 0, 2]);
        assert_eq!(t.port.to_ne_bytes(), 80u16.to_be_bytes());
        assert_eq!(t.ifindex, 5);
        assert_eq!(PortForward::from_raw(&k, &t), Some(f));
        // A wildcard is host address 0.
        let w = PortForward { host_ip: None, ..f };
        assert_eq!(w.to_raw().0.host_addr, 0);
        assert_eq!(PortForward::from_raw(&w.to_raw().0, &t), Some(w));
        assert_eq!(w.to_string(), "*:8080/udp -> 172.19.0.2:80");
        // Not a protocol netns maps.
        let odd = PortKey { proto: 47, ..k };
        assert_eq!(PortForward::from_raw(&odd, &t), None);
    }

    #[test]
    fn port_forward6_byte_order() {
        let f = PortForward6 {
            host_ip: Some("2001:db8:100::2".parse().unwrap()),
            host_port: 8080,
            proto: Proto::Tcp,
            target: "[fd00:19::2]:80".parse().unwrap(),
            ifindex: 5,
            runtime_binds: false,
        };
        let (k, t) = f.to_raw();
        assert_eq!(k.host_addr.octets()[..4], [0x20, 0x01, 0x0d, 0xb8]);
        assert_eq!(k.host_port.to_ne_bytes(), 8080u16.to_be_bytes());
        assert_eq!(t.addr.octets()[..2], [0xfd, 0x00]);
        assert_eq!(t.port.to_ne_bytes(), 80u16.to_be_bytes());
        assert_eq!(PortForward6::from_raw(&k, &t), Some(f));
        let w = PortForward6 { host_ip: None, ..f };
        assert!(w.to_raw().0.host_addr.is_zero());
        assert_eq!(PortForward6::from_raw(&w.to_raw().0, &t), Some(w));
        assert_eq!(w.to_string(), "[::]:8080/tcp -> [fd00:19::2]:80");
    }

    #[test]
    fn protocol_numbers_and_names() {
        for p in [Proto::Tcp, Proto::Udp] {
            assert_eq!(Proto::from_number(p.number()), Some(p));
        }
        assert_eq!(Proto::from_number(1), None);
        assert_eq!(serde_json::to_string(&Proto::Udp).unwrap(), "\"udp\"");
    }
}
