//! `NETNS_CT`: both halves of every translated flow, in host order.

use std::net::{Ipv4Addr, SocketAddrV4};

use aya::maps::{HashMap, MapData};
use netns_common::{Stat, ct_kind, ct_state, dir, maps};
use serde::Serialize;

use super::{Datapath, DatapathError, absent_ok, hash_entries};

/// Source and destination of a packet. For ICMP queries the identifier stands in for
/// the port: the source port of a request, the destination port of a reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub struct Tuple {
    pub src: SocketAddrV4,
    pub dst: SocketAddrV4,
}

impl Tuple {
    /// The tuple a reply to this packet carries.
    pub fn reversed(self) -> Tuple {
        Tuple {
            src: self.dst,
            dst: self.src,
        }
    }

    fn from_raw(t: &netns_common::Tuple) -> Tuple {
        let a = |addr: u32, port: u16| {
            SocketAddrV4::new(Ipv4Addr::from(u32::from_be(addr)), u16::from_be(port))
        };
        Tuple {
            src: a(t.saddr, t.sport),
            dst: a(t.daddr, t.dport),
        }
    }

    fn to_raw(self) -> netns_common::Tuple {
        netns_common::Tuple {
            saddr: u32::from(*self.src.ip()).to_be(),
            daddr: u32::from(*self.dst.ip()).to_be(),
            sport: self.src.port().to_be(),
            dport: self.dst.port().to_be(),
        }
    }
}

/// Where in the datapath a conntrack key was seen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Dir {
    /// Leaving through the uplink: the entry rewrites the source.
    UplinkEgress,
    /// Arriving on the uplink: the entry rewrites the destination.
    UplinkIngress,
    /// Arriving from a container on its bridge port (hairpin).
    Bridge,
}

impl Dir {
    /// Where the other half of a flow is seen.
    pub fn partner(self) -> Dir {
        match self {
            Dir::UplinkEgress => Dir::UplinkIngress,
            Dir::UplinkIngress => Dir::UplinkEgress,
            Dir::Bridge => Dir::Bridge,
        }
    }

    fn from_raw(d: u8) -> Option<Dir> {
        match d {
            dir::UPLINK_EGRESS => Some(Dir::UplinkEgress),
            dir::UPLINK_INGRESS => Some(Dir::UplinkIngress),
            dir::BRIDGE => Some(Dir::Bridge),
            _ => None,
        }
    }

    fn to_raw(self) -> u8 {
        match self {
            Dir::UplinkEgress => dir::UPLINK_EGRESS,
            Dir::UplinkIngress => dir::UPLINK_INGRESS,
            Dir::Bridge => dir::BRIDGE,
        }
    }
}

/// What created a flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FlowKind {
    /// Masquerade of a flow a container opened.
    Snat,
    /// Port forward of a flow a peer opened.
    Dnat,
    /// A container reaching a port forward through a host address.
    Hairpin,
}

/// One direction's connection state (a coarse version of Linux conntrack's).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CtState {
    New,
    Established,
    FinWait,
    Close,
}

impl CtState {
    fn from_raw(s: u8) -> CtState {
        match s {
            ct_state::ESTABLISHED => CtState::Established,
            ct_state::FIN_WAIT => CtState::FinWait,
            ct_state::CLOSE => CtState::Close,
            _ => CtState::New,
        }
    }
}

/// A conntrack key: the tuple as seen at one hook point.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub struct ConntrackKey {
    pub tuple: Tuple,
    /// IP protocol number (any: other protocols are masqueraded by address).
    pub proto: u8,
    pub dir: Dir,
}

impl ConntrackKey {
    fn to_raw(self) -> netns_common::CtKey {
        netns_common::CtKey::new(self.tuple.to_raw(), self.proto, self.dir.to_raw())
    }
}

/// One half of a flow: what a packet matching `key` is rewritten to, and its counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct ConntrackEntry {
    pub key: ConntrackKey,
    pub xlat: Tuple,
    pub state: CtState,
    pub kind: FlowKind,
    /// CLOCK_MONOTONIC nanoseconds (`bpf_ktime_get_ns`) at creation and at the last
    /// packet in this direction.
    pub created_ns: u64,
    pub last_seen_ns: u64,
    pub packets: u64,
    pub bytes: u64,
}

impl ConntrackEntry {
    /// The key of the other half of this flow.
    pub fn partner_key(&self) -> ConntrackKey {
        ConntrackKey {
            tuple: self.xlat.reversed(),
            proto: self.key.proto,
            dir: self.key.dir.partner(),
        }
    }

    /// None for a direction the programs never write.
    fn from_raw(k: &netns_common::CtKey, v: &netns_common::CtEntry) -> Option<ConntrackEntry> {
        Some(ConntrackEntry {
            key: ConntrackKey {
                tuple: Tuple::from_raw(&k.tuple),
                proto: k.proto,
                dir: Dir::from_raw(k.dir)?,
            },
            xlat: Tuple::from_raw(&v.xlat),
            state: CtState::from_raw(v.state),
            kind: match v.kind {
                ct_kind::SNAT => FlowKind::Snat,
                ct_kind::DNAT => FlowKind::Dnat,
                _ => FlowKind::Hairpin,
            },
            created_ns: v.created_ns,
            last_seen_ns: v.last_seen_ns,
            packets: v.packets,
            bytes: v.bytes,
        })
    }
}

impl Datapath {
    fn conntrack_map(
        &self,
    ) -> Result<HashMap<MapData, netns_common::CtKey, netns_common::CtEntry>, DatapathError> {
        self.hash_map(maps::CONNTRACK, true, "opening the conntrack map")
    }

    /// All conntrack entries (both halves of every flow).
    pub fn conntrack_entries(&self) -> Result<Vec<ConntrackEntry>, DatapathError> {
        Ok(
            hash_entries(&self.conntrack_map()?, "reading the conntrack map")?
                .iter()
                .filter_map(|(k, v)| ConntrackEntry::from_raw(k, v))
                .collect(),
        )
    }

    /// Deletes every conntrack entry matching `pred`; returns how many.
    pub fn purge_conntrack(
        &self,
        pred: impl Fn(&ConntrackEntry) -> bool,
    ) -> Result<usize, DatapathError> {
        let doomed: Vec<ConntrackKey> = self
            .conntrack_entries()?
            .into_iter()
            .filter(|e| pred(e))
            .map(|e| e.key)
            .collect();
        self.delete_conntrack(&doomed)
    }

    /// Deletes the given conntrack keys (absent ones are fine); returns how many went.
    /// For callers that already read the table: no second walk over it.
    pub fn delete_conntrack<'a>(
        &self,
        keys: impl IntoIterator<Item = &'a ConntrackKey>,
    ) -> Result<usize, DatapathError> {
        let mut ct = self.conntrack_map()?;
        let mut n = 0;
        for k in keys {
            if absent_ok(ct.remove(&k.to_raw()), "deleting a conntrack entry")?.is_some() {
                n += 1;
            }
        }
        self.add_stat(Stat::CtUserRemoved, n as u64)?;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conntrack_byte_order_and_partner() {
        let k = netns_common::CtKey {
            tuple: netns_common::Tuple {
                saddr: u32::from_ne_bytes([172, 19, 0, 2]),
                daddr: u32::from_ne_bytes([198, 51, 100, 1]),
                sport: u16::from_ne_bytes(40000u16.to_be_bytes()),
                dport: u16::from_ne_bytes(53u16.to_be_bytes()),
            },
            proto: netns_common::IPPROTO_UDP,
            dir: dir::UPLINK_EGRESS,
            _pad: [0; 2],
        };
        let v = netns_common::CtEntry {
            xlat: netns_common::Tuple {
                saddr: u32::from_ne_bytes([198, 51, 100, 3]),
                sport: u16::from_ne_bytes(61000u16.to_be_bytes()),
                ..k.tuple
            },
            state: ct_state::ESTABLISHED,
            kind: ct_kind::SNAT,
            packets: 3,
            ..Default::default()
        };
        let e = ConntrackEntry::from_raw(&k, &v).unwrap();
        assert_eq!(e.key.tuple.src, "172.19.0.2:40000".parse().unwrap());
        assert_eq!(e.key.tuple.dst, "198.51.100.1:53".parse().unwrap());
        assert_eq!(e.xlat.src, "198.51.100.3:61000".parse().unwrap());
        assert_eq!(
            (e.state, e.kind, e.key.dir),
            (CtState::Established, FlowKind::Snat, Dir::UplinkEgress)
        );
        assert_eq!(e.key.to_raw(), k);
        // The reply half: the translated tuple reversed, seen at uplink ingress.
        let p = e.partner_key();
        assert_eq!(p.dir, Dir::UplinkIngress);
        assert_eq!(p.tuple.src, "198.51.100.1:53".parse().unwrap());
        assert_eq!(p.tuple.dst, "198.51.100.3:61000".parse().unwrap());
        assert_eq!(p.to_raw().tuple, v.xlat.reversed());
        assert_eq!(Dir::Bridge.partner(), Dir::Bridge);
        let bad = netns_common::CtKey { dir: 9, ..k };
        assert_eq!(ConntrackEntry::from_raw(&bad, &v), None);
    }
}
