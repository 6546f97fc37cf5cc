//! `NETNS_CT6`: the IPv6 flows (NAT66, IPv6 port forwards and hairpin), one LRU table
//! of pairs the programs expire by themselves. Read as whole flows for `conntrack ls`,
//! emptied by `conntrack flush`.

use std::collections::HashMap;
use std::net::{Ipv6Addr, SocketAddrV6};

use netns_common::{Ct6Entry, Ct6Key, Tuple6, ct_flags, ct_kind, maps};

use super::conntrack::{CtState, FlowKind};
use super::{Datapath, DatapathError, clear_map, io, sys};

/// A tuple in host order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tuple6Addrs {
    pub src: SocketAddrV6,
    pub dst: SocketAddrV6,
}

fn tuple(t: &Tuple6) -> Tuple6Addrs {
    let a = |ip: &netns_common::In6, port: u16| {
        SocketAddrV6::new(Ipv6Addr::from(ip.octets()), u16::from_be(port), 0, 0)
    };
    Tuple6Addrs {
        src: a(&t.saddr, t.sport),
        dst: a(&t.daddr, t.dport),
    }
}

/// One IPv6 flow, from the half that opened it.
#[derive(Debug, Clone)]
pub struct Flow6 {
    pub proto: u8,
    pub kind: FlowKind,
    pub original: Tuple6Addrs,
    pub translated: Tuple6Addrs,
    pub state: CtState,
    pub owner: Ipv6Addr,
    pub replied: bool,
    pub stream: bool,
    pub created_ns: u64,
    pub last_seen_ns: u64,
    pub packets: u64,
    pub bytes: u64,
    pub reply_packets: u64,
    pub reply_bytes: u64,
    /// The reverse half is gone (the LRU evicted it; the next packet from the
    /// container's side rebuilds it).
    pub orphan: bool,
}

fn kind(k: u8) -> FlowKind {
    match k {
        ct_kind::DNAT => FlowKind::Dnat,
        ct_kind::HAIRPIN => FlowKind::Hairpin,
        _ => FlowKind::Snat,
    }
}

/// The flows of `entries`: each forward half with its partner.
pub fn flows6(entries: &[(Ct6Key, Ct6Entry)]) -> Vec<Flow6> {
    let by_key: HashMap<Ct6Key, &Ct6Entry> = entries.iter().map(|(k, e)| (*k, e)).collect();
    entries
        .iter()
        .filter(|(_, e)| e.flags & ct_flags::FWD != 0)
        .map(|(k, e)| {
            let rev = by_key.get(&e.partner_key(k));
            Flow6 {
                proto: k.proto,
                kind: kind(e.kind),
                original: tuple(&k.tuple),
                translated: tuple(&e.xlat),
                state: CtState::from_raw(e.state),
                owner: Ipv6Addr::from(e.owner.octets()),
                replied: e.flags & ct_flags::REPLIED != 0,
                stream: e.flags & ct_flags::STREAM != 0,
                created_ns: e.created_ns,
                last_seen_ns: rev.map_or(e.last_seen_ns, |r| r.last_seen_ns.max(e.last_seen_ns)),
                packets: e.packets,
                bytes: e.bytes,
                reply_packets: rev.map_or(0, |r| r.packets),
                reply_bytes: rev.map_or(0, |r| r.bytes),
                orphan: rev.is_none(),
            }
        })
        .collect()
}

impl Datapath {
    fn ct6_map(
        &self,
    ) -> Result<aya::maps::HashMap<aya::maps::MapData, Ct6Key, Ct6Entry>, DatapathError> {
        self.hash_map(maps::CONNTRACK6, true, "opening the IPv6 conntrack map")
    }

    /// Every half in `NETNS_CT6`.
    pub fn conntrack6_entries(&self) -> Result<Vec<(Ct6Key, Ct6Entry)>, DatapathError> {
        sys::lookup_batch(&self.ct6_map()?).map_err(io("reading NETNS_CT6"))
    }

    /// Empties `NETNS_CT6`; returns how many halves it held.
    pub fn flush_conntrack6(&self) -> Result<usize, DatapathError> {
        clear_map(&mut self.ct6_map()?, maps::CONNTRACK6)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use netns_common::{In6, dir};

    fn a(s: &str) -> In6 {
        In6::from_octets(s.parse::<Ipv6Addr>().unwrap().octets())
    }

    #[test]
    fn pairs_halves_into_flows() {
        let orig = Tuple6 {
            saddr: a("fd00:19::2"),
            daddr: a("2001:db8:100::1"),
            sport: 40000u16.to_be(),
            dport: 80u16.to_be(),
        };
        let xlat = Tuple6 {
            saddr: a("2001:db8:100::2"),
            sport: 61000u16.to_be(),
            ..orig
        };
        let fk = Ct6Key::new(orig, 6, dir::UPLINK_EGRESS);
        let fwd = Ct6Entry {
            xlat,
            state: netns_common::ct_state::ESTABLISHED,
            kind: ct_kind::SNAT,
            flags: ct_flags::FWD | ct_flags::REPLIED,
            _pad: 0,
            created_ns: 1,
            last_seen_ns: 5,
            packets: 3,
            bytes: 300,
            owner: a("fd00:19::2"),
        };
        let rk = fwd.partner_key(&fk);
        let rev = Ct6Entry {
            xlat: orig.reversed(),
            flags: ct_flags::REPLIED,
            last_seen_ns: 9,
            packets: 2,
            bytes: 200,
            ..fwd
        };
        let f = flows6(&[(fk, fwd), (rk, rev)]);
        assert_eq!(f.len(), 1, "one flow from two halves");
        let f = &f[0];
        assert_eq!(f.original.src, "[fd00:19::2]:40000".parse().unwrap());
        assert_eq!(f.translated.src, "[2001:db8:100::2]:61000".parse().unwrap());
        assert_eq!((f.packets, f.reply_packets, f.last_seen_ns), (3, 2, 9));
        assert!(f.replied && !f.orphan);
        assert!(flows6(&[(fk, fwd)])[0].orphan);
    }
}
