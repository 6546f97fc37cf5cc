//! The conntrack maps, in host order: `NETNS_CT` (assured pairs) and `NETNS_CTNEW`
//! (pairs whose reply was not seen yet), both halves of every translated flow;
//! `NETNS_CTKEEP` (a copy of each assured half, from which the datapath rebuilds a
//! half the LRU lost); `NETNS_CTCOUNT` (pairs per container, the
//! `--ct-max-per-container` budget).
//!
//! A table is read in one pass with BPF_MAP_LOOKUP_BATCH ([`sys::lookup_batch`]), never
//! key by key. Nothing here walks a table when a container goes: its entries are stale
//! from the moment its endpoint is removed ([`Datapath::retire_endpoint`]), the
//! datapath treats them as absent and deletes them where it meets them, and `netns gc`
//! sweeps the rest.

use std::collections::{HashMap as StdHashMap, HashSet};
use std::net::{Ipv4Addr, SocketAddrV4};

use aya::maps::{HashMap, MapData};
use netns_common::{CtCount, CtEntry, CtKeep, CtKey, Stat, ct_flags, ct_kind, ct_state, dir, maps};
use serde::Serialize;

use super::{Datapath, DatapathError, absent_ok, clear_map, hash_entries, io, map_err, sys};

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

impl FlowKind {
    fn from_raw(k: u8) -> FlowKind {
        match k {
            ct_kind::SNAT => FlowKind::Snat,
            ct_kind::DNAT => FlowKind::Dnat,
            _ => FlowKind::Hairpin,
        }
    }
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
    pub(super) fn from_raw(s: u8) -> CtState {
        match s {
            ct_state::ESTABLISHED => CtState::Established,
            ct_state::FIN_WAIT => CtState::FinWait,
            ct_state::CLOSE => CtState::Close,
            _ => CtState::New,
        }
    }
}

/// Which table a half lives in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CtTable {
    /// `NETNS_CT`: assured pairs (TCP handshake done, a reply seen for the rest).
    Main,
    /// `NETNS_CTNEW`: pairs whose reply was not seen yet.
    New,
}

impl CtTable {
    pub const ALL: [CtTable; 2] = [CtTable::Main, CtTable::New];

    pub fn map_name(self) -> &'static str {
        match self {
            CtTable::Main => maps::CONNTRACK,
            CtTable::New => maps::CT_NEW,
        }
    }
}

/// The bits of [`netns_common::ct_flags`], by name.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize)]
pub struct CtFlags {
    /// The half of the packet that opened the flow.
    pub fwd: bool,
    /// A packet of the other direction was seen.
    pub replied: bool,
    /// UDP: replied and active more than 2 s after creation (the `udp_stream` timeout).
    pub stream: bool,
    /// TCP: the sequence number and window of this direction are known.
    pub seq_known: bool,
}

impl CtFlags {
    fn from_raw(f: u8) -> CtFlags {
        CtFlags {
            fwd: f & ct_flags::FWD != 0,
            replied: f & ct_flags::REPLIED != 0,
            stream: f & ct_flags::STREAM != 0,
            seq_known: f & ct_flags::SEQ_KNOWN != 0,
        }
    }

    /// The flags of a pair: what either half carries.
    pub fn union(self, o: CtFlags) -> CtFlags {
        CtFlags {
            fwd: self.fwd || o.fwd,
            replied: self.replied || o.replied,
            stream: self.stream || o.stream,
            seq_known: self.seq_known || o.seq_known,
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
    fn to_raw(self) -> CtKey {
        CtKey::new(self.tuple.to_raw(), self.proto, self.dir.to_raw())
    }

    /// None for a direction the programs never write.
    fn from_raw(k: &CtKey) -> Option<ConntrackKey> {
        Some(ConntrackKey {
            tuple: Tuple::from_raw(&k.tuple),
            proto: k.proto,
            dir: Dir::from_raw(k.dir)?,
        })
    }

    /// The key of the half that translates back to this one, if this half rewrites
    /// packets to `xlat`.
    fn partner_with(self, xlat: Tuple) -> ConntrackKey {
        ConntrackKey {
            tuple: xlat.reversed(),
            proto: self.proto,
            dir: self.dir.partner(),
        }
    }
}

/// One half of a flow: what a packet matching `key` is rewritten to, and its counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct ConntrackEntry {
    pub key: ConntrackKey,
    pub table: CtTable,
    pub xlat: Tuple,
    pub state: CtState,
    pub kind: FlowKind,
    pub flags: CtFlags,
    /// The container the flow belongs to, and its endpoint generation when the flow
    /// was made: when the endpoint is gone or has another generation, the entry is
    /// stale.
    pub owner: Ipv4Addr,
    pub generation: u32,
    /// CLOCK_MONOTONIC_COARSE nanoseconds (`bpf_ktime_get_coarse_ns`) at creation and
    /// at the last packet in this direction.
    pub created_ns: u64,
    pub last_seen_ns: u64,
    pub packets: u64,
    pub bytes: u64,
}

impl ConntrackEntry {
    /// The key of the other half of this flow.
    pub fn partner_key(&self) -> ConntrackKey {
        self.key.partner_with(self.xlat)
    }

    /// None for a direction the programs never write.
    fn from_raw(k: &CtKey, v: &CtEntry, table: CtTable) -> Option<ConntrackEntry> {
        Some(ConntrackEntry {
            key: ConntrackKey::from_raw(k)?,
            table,
            xlat: Tuple::from_raw(&v.xlat),
            state: CtState::from_raw(v.state),
            kind: FlowKind::from_raw(v.kind),
            flags: CtFlags::from_raw(v.flags),
            owner: Ipv4Addr::from(u32::from_be(v.owner)),
            generation: v.generation,
            created_ns: v.created_ns,
            last_seen_ns: v.last_seen_ns,
            packets: v.packets,
            bytes: v.bytes,
        })
    }
}

/// A copy of an assured half in `NETNS_CTKEEP`: enough to rebuild it while its partner
/// lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct ConntrackKeep {
    pub key: ConntrackKey,
    pub xlat: Tuple,
    pub kind: FlowKind,
    /// A copy of the half of the packet that opened the flow.
    pub fwd: bool,
    pub owner: Ipv4Addr,
    pub generation: u32,
}

impl ConntrackKeep {
    /// The key of the half the copy's half pairs with.
    pub fn partner_key(&self) -> ConntrackKey {
        self.key.partner_with(self.xlat)
    }

    fn from_raw(k: &CtKey, v: &CtKeep) -> Option<ConntrackKeep> {
        Some(ConntrackKeep {
            key: ConntrackKey::from_raw(k)?,
            xlat: Tuple::from_raw(&v.xlat),
            kind: FlowKind::from_raw(v.kind),
            fwd: v.flags & ct_flags::FWD != 0,
            owner: Ipv4Addr::from(u32::from_be(v.owner)),
            generation: v.generation,
        })
    }
}

/// How many entries each conntrack map holds now.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct ConntrackSizes {
    /// `NETNS_CT` and `NETNS_CTNEW` entries (halves).
    pub main: usize,
    pub new: usize,
    /// `NETNS_CTKEEP` copies.
    pub kept: usize,
}

type CtMap = HashMap<MapData, CtKey, CtEntry>;
type KeepMap = HashMap<MapData, CtKey, CtKeep>;
type CountMap = HashMap<MapData, u32, CtCount>;

fn owner_key(ip: Ipv4Addr) -> u32 {
    u32::from(ip).to_be()
}

/// The conntrack maps opened once, for many point lookups and deletes (a sweep's
/// re-checks): opening a pin per lookup would double the system calls.
pub(super) struct OpenTables {
    main: CtMap,
    new: CtMap,
    keep: KeepMap,
    eps: super::Endpoints,
}

impl OpenTables {
    fn table(&self, t: CtTable) -> &CtMap {
        match t {
            CtTable::Main => &self.main,
            CtTable::New => &self.new,
        }
    }

    /// The half at `k` as the datapath finds it: the main table first.
    pub(super) fn entry(&self, k: &ConntrackKey) -> Result<Option<ConntrackEntry>, DatapathError> {
        let raw = k.to_raw();
        for t in CtTable::ALL {
            if let Some(v) = absent_ok(self.table(t).get(&raw, 0), "reading a conntrack entry")? {
                return Ok(ConntrackEntry::from_raw(&raw, &v, t));
            }
        }
        Ok(None)
    }

    pub(super) fn keep(&self, k: &ConntrackKey) -> Result<Option<ConntrackKeep>, DatapathError> {
        let raw = k.to_raw();
        Ok(
            absent_ok(self.keep.get(&raw, 0), "reading a conntrack copy")?
                .and_then(|v| ConntrackKeep::from_raw(&raw, &v)),
        )
    }

    /// The endpoint generation of the container at `ip` (None: no such endpoint).
    pub(super) fn generation(&self, ip: Ipv4Addr) -> Result<Option<u32>, DatapathError> {
        Ok(self.eps.get(ip)?.map(|e| e.generation))
    }

    /// Deletes halves from the tables they are in and copies; returns how many halves
    /// and copies went (absent ones are fine).
    pub(super) fn remove(
        &mut self,
        halves: &[(CtTable, ConntrackKey)],
        copies: &[ConntrackKey],
    ) -> Result<(usize, usize), DatapathError> {
        let (mut n, mut c) = (0, 0);
        for (t, k) in halves {
            let m = match t {
                CtTable::Main => &mut self.main,
                CtTable::New => &mut self.new,
            };
            if absent_ok(m.remove(&k.to_raw()), "deleting a conntrack entry")?.is_some() {
                n += 1;
            }
        }
        for k in copies {
            if absent_ok(self.keep.remove(&k.to_raw()), "deleting a conntrack copy")?.is_some() {
                c += 1;
            }
        }
        Ok((n, c))
    }
}

impl Datapath {
    fn ct_table(&self, t: CtTable) -> Result<CtMap, DatapathError> {
        self.hash_map(
            t.map_name(),
            true,
            &format!("opening the conntrack map {}", t.map_name()),
        )
    }

    fn ct_keep_map(&self) -> Result<KeepMap, DatapathError> {
        self.hash_map(maps::CT_KEEP, false, "opening the conntrack copies map")
    }

    fn ct_count_map(&self) -> Result<CountMap, DatapathError> {
        self.hash_map(maps::CT_COUNT, false, "opening the conntrack count map")
    }

    pub(super) fn open_tables(&self) -> Result<OpenTables, DatapathError> {
        Ok(OpenTables {
            main: self.ct_table(CtTable::Main)?,
            new: self.ct_table(CtTable::New)?,
            keep: self.ct_keep_map()?,
            eps: self.endpoints()?,
        })
    }

    fn table_entries(&self, t: CtTable) -> Result<Vec<ConntrackEntry>, DatapathError> {
        let what = format!("reading the conntrack map {}", t.map_name());
        Ok(hash_entries(&self.ct_table(t)?, &what)?
            .iter()
            .filter_map(|(k, v)| ConntrackEntry::from_raw(k, v, t))
            .collect())
    }

    /// All conntrack entries (both halves of every flow) of both tables. The unreplied
    /// table is read first: a pair promoted meanwhile (written to the main table, then
    /// removed from the unreplied one) is then seen at least once, never missed. A key
    /// in both tables is the main table's, as in the datapath's lookup.
    pub fn conntrack_entries(&self) -> Result<Vec<ConntrackEntry>, DatapathError> {
        let new = self.table_entries(CtTable::New)?;
        let mut all = self.table_entries(CtTable::Main)?;
        let main: HashSet<ConntrackKey> = all.iter().map(|e| e.key).collect();
        all.extend(new.into_iter().filter(|e| !main.contains(&e.key)));
        Ok(all)
    }

    /// Every copy in `NETNS_CTKEEP`.
    pub fn conntrack_keeps(&self) -> Result<Vec<ConntrackKeep>, DatapathError> {
        Ok(
            hash_entries(&self.ct_keep_map()?, "reading the conntrack copies map")?
                .iter()
                .filter_map(|(k, v)| ConntrackKeep::from_raw(k, v))
                .collect(),
        )
    }

    /// How many entries the conntrack maps hold (one batch walk of each, keys and
    /// values: hash maps have no cheaper count).
    pub fn conntrack_sizes(&self) -> Result<ConntrackSizes, DatapathError> {
        let n = |r: std::io::Result<usize>, what: &str| r.map_err(io(what));
        Ok(ConntrackSizes {
            main: n(
                sys::lookup_batch(&self.ct_table(CtTable::Main)?).map(|v| v.len()),
                "counting NETNS_CT",
            )?,
            new: n(
                sys::lookup_batch(&self.ct_table(CtTable::New)?).map(|v| v.len()),
                "counting NETNS_CTNEW",
            )?,
            kept: n(
                sys::lookup_batch(&self.ct_keep_map()?).map(|v| v.len()),
                "counting NETNS_CTKEEP",
            )?,
        })
    }

    /// The endpoint generation of every container address.
    pub fn endpoint_generations(&self) -> Result<StdHashMap<Ipv4Addr, u32>, DatapathError> {
        Ok(self
            .endpoints()?
            .list()?
            .into_iter()
            .map(|(ip, ep)| (ip, ep.generation))
            .collect())
    }

    /// Deletes the given conntrack keys from both tables, with their copies (absent
    /// ones are fine); returns how many entries went. For callers that already read the
    /// tables: no second walk over them.
    pub fn delete_conntrack<'a>(
        &self,
        keys: impl IntoIterator<Item = &'a ConntrackKey>,
    ) -> Result<usize, DatapathError> {
        let raw: Vec<CtKey> = keys.into_iter().map(|k| k.to_raw()).collect();
        if raw.is_empty() {
            return Ok(0);
        }
        let mut n = 0;
        for t in CtTable::ALL {
            n += sys::delete_batch(&mut self.ct_table(t)?, &raw)
                .map_err(io(format!("deleting from {}", t.map_name())))?;
        }
        sys::delete_batch(&mut self.ct_keep_map()?, &raw)
            .map_err(io("deleting from NETNS_CTKEEP"))?;
        self.add_stat(Stat::CtUserRemoved, n as u64)?;
        Ok(n)
    }

    /// Empties the conntrack tables, the copies and the per-container counts; returns
    /// how many entries (halves) went from the tables.
    pub fn flush_conntrack(&self) -> Result<usize, DatapathError> {
        let mut n = 0;
        for t in CtTable::ALL {
            n += clear_map(&mut self.ct_table(t)?, t.map_name())?;
        }
        clear_map(&mut self.ct_keep_map()?, maps::CT_KEEP)?;
        clear_map(&mut self.ct_count_map()?, maps::CT_COUNT)?;
        self.add_stat(Stat::CtUserRemoved, n as u64)?;
        Ok(n)
    }

    /// Every container's conntrack budget count (`NETNS_CTCOUNT`).
    pub fn ct_counts(&self) -> Result<Vec<(Ipv4Addr, CtCount)>, DatapathError> {
        Ok(
            hash_entries(&self.ct_count_map()?, "reading the conntrack count map")?
                .into_iter()
                .map(|(k, c)| (Ipv4Addr::from(u32::from_be(k)), c))
                .collect(),
        )
    }

    /// Sets a container's count (the datapath's in-place increments meanwhile are lost:
    /// the count is a bound the datapath recounts itself when a container reaches it).
    pub fn set_ct_count(&self, ip: Ipv4Addr, c: CtCount) -> Result<(), DatapathError> {
        self.ct_count_map()?
            .insert(owner_key(ip), c, 0)
            .map_err(map_err(format!("writing the conntrack count of {ip}")))
    }

    /// Drops a container's count; false if it had none.
    pub fn remove_ct_count(&self, ip: Ipv4Addr) -> Result<bool, DatapathError> {
        Ok(absent_ok(
            self.ct_count_map()?.remove(&owner_key(ip)),
            format!("removing the conntrack count of {ip}"),
        )?
        .is_some())
    }

    /// A container's network goes (teardown, a failed prestart's rollback): its
    /// endpoint is unregistered and its bridge port closed (unless the ifindex already
    /// serves another container), and its budget count dropped (no error if absent).
    ///
    /// The conntrack tables are not walked: every entry the container owns carries its
    /// endpoint generation, so from here on it is stale. The datapath treats a stale
    /// entry as absent and deletes it where it meets it; a new container given the same
    /// address has another generation and never receives the old one's flows; `netns
    /// conntrack ls` hides them and `netns gc` sweeps them. (Walking the tables here
    /// made a stop cost grow with the table, 250 ms at 59,000 entries, and a
    /// GET_NEXT_KEY walk may not end under churn.)
    pub fn retire_endpoint(&mut self, ip: Ipv4Addr) -> Result<(), DatapathError> {
        self.remove_endpoint(ip)?;
        self.remove_ct_count(ip)?;
        Ok(())
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
            flags: ct_flags::FWD | ct_flags::REPLIED | ct_flags::STREAM,
            owner: u32::from_ne_bytes([172, 19, 0, 2]),
            generation: 77,
            packets: 3,
            ..Default::default()
        };
        let e = ConntrackEntry::from_raw(&k, &v, CtTable::Main).unwrap();
        assert_eq!(e.key.tuple.src, "172.19.0.2:40000".parse().unwrap());
        assert_eq!(e.key.tuple.dst, "198.51.100.1:53".parse().unwrap());
        assert_eq!(e.xlat.src, "198.51.100.3:61000".parse().unwrap());
        assert_eq!(
            (e.state, e.kind, e.key.dir, e.table),
            (
                CtState::Established,
                FlowKind::Snat,
                Dir::UplinkEgress,
                CtTable::Main
            )
        );
        assert_eq!(
            e.flags,
            CtFlags {
                fwd: true,
                replied: true,
                stream: true,
                seq_known: false
            }
        );
        assert_eq!((e.owner, e.generation), (Ipv4Addr::new(172, 19, 0, 2), 77));
        assert_eq!(e.key.to_raw(), k);
        // The reply half: the translated tuple reversed, seen at uplink ingress, the
        // same key netns-common computes.
        let p = e.partner_key();
        assert_eq!(p.dir, Dir::UplinkIngress);
        assert_eq!(p.tuple.src, "198.51.100.1:53".parse().unwrap());
        assert_eq!(p.tuple.dst, "198.51.100.3:61000".parse().unwrap());
        assert_eq!(p.to_raw(), v.partner_key(&k));
        assert_eq!(Dir::Bridge.partner(), Dir::Bridge);
        let bad = netns_common::CtKey { dir: 9, ..k };
        assert_eq!(ConntrackEntry::from_raw(&bad, &v, CtTable::New), None);
        // Its copy names the same partner.
        let c = netns_common::CtKeep {
            xlat: v.xlat,
            kind: v.kind,
            flags: ct_flags::FWD,
            owner: v.owner,
            generation: 77,
            ..Default::default()
        };
        let c = ConntrackKeep::from_raw(&k, &c).unwrap();
        assert!(c.fwd && c.kind == FlowKind::Snat);
        assert_eq!(c.partner_key(), p);
        assert_eq!(owner_key(e.owner).to_ne_bytes(), [172, 19, 0, 2]);
    }
}
