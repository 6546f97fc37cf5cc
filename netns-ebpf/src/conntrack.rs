//! The conntrack-like map: lookup, accounting, coarse TCP state, and creation of a
//! forward/reverse entry pair with source-port allocation.

use aya_ebpf::{
    bindings::{BPF_ANY, BPF_F_CURRENT_NETNS, BPF_NOEXIST, bpf_sock_tuple},
    helpers::{
        bpf_get_prandom_u32, bpf_ktime_get_ns, bpf_sk_lookup_tcp, bpf_sk_lookup_udp, bpf_sk_release,
    },
    programs::TcContext,
};
use netns_common::{CtEntry, CtKey, IPPROTO_TCP, IPPROTO_UDP, Stat, Tuple, ct_kind, ct_state, dir};

use crate::{
    maps::CONNTRACK,
    packet::{L4, Packet, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN, icmp_query},
    stats,
};

/// Random probes after the original port is taken. Bounded for the verifier; with a
/// range of ~28k ports and a sparse table the chance that 16 probes all collide is nil,
/// and when the table is dense the drop is counted rather than a wrong translation made.
const PORT_PROBES: u32 = 16;

#[inline(always)]
pub fn key(pkt: &Packet, dir: u8) -> CtKey {
    CtKey::new(pkt.tuple, pkt.proto, dir)
}

/// Finds the entry for `key` and accounts the packet to it. Returns the translated
/// tuple, the entry's kind and its packet count.
#[inline(always)]
pub fn lookup(key: &CtKey, pkt: &Packet, len: u32) -> Option<(Tuple, u8, u64)> {
    let e = CONNTRACK.get_ptr_mut(key)?;
    // SAFETY: a valid map value pointer; concurrent writers only touch counters and
    // single-word fields, where a lost update is harmless.
    unsafe {
        let now = bpf_ktime_get_ns();
        (*e).last_seen_ns = now;
        // Plain adds: core has no atomics for the BPF target, and a flow's packets in one
        // direction are almost always handled on one CPU (one veth queue).
        (*e).packets += 1;
        (*e).bytes += len as u64;
        if pkt.proto == IPPROTO_TCP && !pkt.later_fragment {
            let s = next_tcp_state((*e).state, pkt.l4_flags);
            if s != (*e).state {
                (*e).state = s;
            }
        }
        Some(((*e).xlat, (*e).kind, (*e).packets))
    }
}

/// A coarse per-direction TCP state; user space combines both directions of a pair.
#[inline(always)]
fn next_tcp_state(cur: u8, flags: u8) -> u8 {
    if flags & TCP_RST != 0 {
        ct_state::CLOSE
    } else if flags & TCP_FIN != 0 {
        if cur == ct_state::CLOSE {
            cur
        } else {
            ct_state::FIN_WAIT
        }
    } else if flags & TCP_SYN != 0 && flags & TCP_ACK == 0 {
        ct_state::NEW
    } else if cur == ct_state::NEW && flags & TCP_ACK != 0 {
        ct_state::ESTABLISHED
    } else {
        cur
    }
}

#[inline(always)]
fn initial_state(pkt: &Packet) -> u8 {
    if pkt.proto == IPPROTO_TCP && pkt.l4_flags & TCP_SYN == 0 {
        // Picked up mid-stream (e.g. after an LRU eviction): treat as established.
        ct_state::ESTABLISHED
    } else {
        ct_state::NEW
    }
}

#[inline(always)]
fn entry(xlat: Tuple, pkt: &Packet, kind: u8, now: u64, len: u32, counted: bool) -> CtEntry {
    CtEntry {
        xlat,
        state: initial_state(pkt),
        kind,
        flags: 0,
        _pad: 0,
        created_ns: now,
        last_seen_ns: now,
        packets: counted as u64,
        bytes: if counted { len as u64 } else { 0 },
        owner: 0,
        generation: 0,
        seq_end: 0,
        win: 0,
        _pad2: 0,
    }
}

/// Does a socket of the host itself own (`local`:`port`) towards `peer`:`peer_port`, or
/// listen on it? Then a reply to that port is the host's, not a container's.
#[inline(always)]
pub fn host_socket_owns(
    ctx: &TcContext,
    proto: u8,
    local: u32,
    port: u16,
    peer: u32,
    peer_port: u16,
) -> bool {
    // SAFETY: zeroed is a valid bpf_sock_tuple; we fill the IPv4 member.
    let mut t: bpf_sock_tuple = unsafe { core::mem::zeroed() };
    t.__bindgen_anon_1.ipv4.saddr = peer;
    t.__bindgen_anon_1.ipv4.daddr = local;
    t.__bindgen_anon_1.ipv4.sport = peer_port;
    t.__bindgen_anon_1.ipv4.dport = port;
    let size = 12; // sizeof(tuple.ipv4)
    let netns = BPF_F_CURRENT_NETNS as u64;
    // SAFETY: helper calls with a valid tuple; a non-null socket is released at once.
    unsafe {
        let sk = match proto {
            IPPROTO_TCP => bpf_sk_lookup_tcp(ctx.skb.skb.cast(), &mut t, size, netns, 0),
            IPPROTO_UDP => bpf_sk_lookup_udp(ctx.skb.skb.cast(), &mut t, size, netns, 0),
            _ => return false,
        };
        if sk.is_null() {
            return false;
        }
        bpf_sk_release(sk.cast());
    }
    true
}

/// Checks the reverse half of a masquerade pair on the egress fast path. LRU eviction
/// can remove one half (Cilium issue 12686): a missing reverse entry is rebuilt; one
/// that another flow has claimed since means this forward entry is stale, and it is
/// deleted so the packet creates a fresh pair. Returns false for the stale case.
#[inline(always)]
pub fn check_reverse(pkt: &Packet, xlat: &Tuple) -> bool {
    let rev_key = CtKey::new(xlat.reversed(), pkt.proto, dir::UPLINK_INGRESS);
    match unsafe { CONNTRACK.get(&rev_key) } {
        Some(r) => {
            if r.xlat.daddr == pkt.tuple.saddr && r.xlat.dport == pkt.tuple.sport {
                return true;
            }
            let _ = CONNTRACK.remove(&key(pkt, dir::UPLINK_EGRESS));
            stats::inc(Stat::CtRetired);
            false
        }
        None => {
            let now = unsafe { bpf_ktime_get_ns() };
            let rev = entry(pkt.tuple.reversed(), pkt, ct_kind::SNAT, now, 0, false);
            if CONNTRACK.insert(&rev_key, &rev, BPF_NOEXIST as u64).is_ok() {
                stats::inc(Stat::CtRebuilt);
            }
            true
        }
    }
}

/// Where a new source-translated pair lives and how its port is chosen.
struct PairSpec {
    /// Hook point of the packet that creates the pair (the forward half's key).
    fwd_dir: u8,
    /// Hook point where the reverse half is looked up.
    rev_dir: u8,
    kind: u8,
    /// Try the packet's own source port first.
    try_orig: bool,
    min: u16,
    max: u16,
}

/// Creates a pair that rewrites the packet to `xlat` (whose source port is chosen
/// here): claims a source port by inserting the reverse half with BPF_NOEXIST, then
/// inserts the forward half. Returns the translated tuple.
#[inline(always)]
fn create_pair(pkt: &Packet, mut xlat: Tuple, spec: PairSpec, len: u32) -> Result<Tuple, Stat> {
    let now = unsafe { bpf_ktime_get_ns() };
    let orig = pkt.tuple;
    let mut rev_key = CtKey::new(xlat.reversed(), pkt.proto, spec.rev_dir);
    let rev = entry(orig.reversed(), pkt, spec.kind, now, len, false);
    xlat.sport = claim_port(
        &mut rev_key,
        &rev,
        orig.sport,
        spec.try_orig,
        spec.min,
        spec.max,
    )?;
    let fwd = entry(xlat, pkt, spec.kind, now, len, true);
    insert_forward(&key(pkt, spec.fwd_dir), &fwd, &rev_key)?;
    Ok(xlat)
}

/// Masquerade a new flow leaving through the uplink: the source becomes `nat_addr` and
/// a port no other flow to the same peer uses (the original port if neither a flow nor
/// a host socket has it).
#[inline(always)]
pub fn create_snat(
    ctx: &TcContext,
    pkt: &Packet,
    nat_addr: u32,
    min: u16,
    max: u16,
    len: u32,
) -> Result<Tuple, Stat> {
    let orig = pkt.tuple;
    let host_owned = host_socket_owns(ctx, pkt.proto, nat_addr, orig.sport, orig.daddr, orig.dport);
    if host_owned {
        stats::inc(Stat::PortHostSocket);
    }
    let xlat = Tuple {
        saddr: nat_addr,
        ..orig
    };
    let spec = PairSpec {
        fwd_dir: dir::UPLINK_EGRESS,
        rev_dir: dir::UPLINK_INGRESS,
        kind: ct_kind::SNAT,
        try_orig: !host_owned,
        min,
        max,
    };
    let xlat = create_pair(pkt, xlat, spec, len)?;
    if xlat.sport == orig.sport {
        stats::inc(Stat::PortKept);
    }
    Ok(xlat)
}

/// Inserts the forward half of a pair whose reverse half `rev_key` is already in; on
/// failure removes that half again, so no orphan is left.
#[inline(always)]
fn insert_forward(fwd_key: &CtKey, fwd: &CtEntry, rev_key: &CtKey) -> Result<(), Stat> {
    if CONNTRACK.insert(fwd_key, fwd, BPF_ANY as u64).is_err() {
        let _ = CONNTRACK.remove(rev_key);
        return Err(Stat::DropCtInsert);
    }
    stats::inc(Stat::CtCreated);
    Ok(())
}

/// Claims a free port on `nat_addr` for a flow to (`peer`, `peer_port`) by inserting the
/// reverse entry `rev_key` (its `dport` varied) with BPF_NOEXIST: the original port
/// first (if `try_orig`), then random probes in [min, max]. Returns the port claimed.
#[inline(always)]
fn claim_port(
    rev_key: &mut CtKey,
    rev: &CtEntry,
    orig_port: u16,
    try_orig: bool,
    min: u16,
    max: u16,
) -> Result<u16, Stat> {
    let span = (max as u32).saturating_sub(min as u32) + 1;
    let mut port = orig_port;
    rev_key.tuple.dport = port;
    let mut claimed = try_orig && CONNTRACK.insert(&*rev_key, rev, BPF_NOEXIST as u64).is_ok();
    let mut i = 0;
    while !claimed && i < PORT_PROBES {
        let p = min as u32 + unsafe { bpf_get_prandom_u32() } % span;
        port = (p as u16).to_be();
        rev_key.tuple.dport = port;
        claimed = CONNTRACK.insert(&*rev_key, rev, BPF_NOEXIST as u64).is_ok();
        i += 1;
    }
    if i > 0 {
        stats::inc(match i {
            1 => Stat::PortRetries1,
            2..=3 => Stat::PortRetries2To3,
            4..=7 => Stat::PortRetries4To7,
            _ => Stat::PortRetries8To16,
        });
    }
    if claimed {
        Ok(port)
    } else {
        Err(Stat::DropPortExhausted)
    }
}

/// Hairpin a container's flow to a port forward: the target sees the gateway as peer.
#[inline(always)]
pub fn create_hairpin(
    pkt: &Packet,
    cfg: &netns_common::Config,
    target_addr: u32,
    target_port: u16,
    len: u32,
) -> Result<Tuple, Stat> {
    let xlat = Tuple {
        saddr: cfg.gateway,
        daddr: target_addr,
        sport: pkt.tuple.sport,
        dport: target_port,
    };
    let spec = PairSpec {
        fwd_dir: dir::BRIDGE,
        rev_dir: dir::BRIDGE,
        kind: ct_kind::HAIRPIN,
        try_orig: true,
        min: cfg.nat_port_min,
        max: cfg.nat_port_max,
    };
    create_pair(pkt, xlat, spec, len)
}

/// Port-forward a new flow arriving on the uplink to `target` (address, port). The
/// container sees the real peer; its replies are translated back on uplink egress.
#[inline(always)]
pub fn create_dnat(
    pkt: &Packet,
    target_addr: u32,
    target_port: u16,
    len: u32,
) -> Result<Tuple, Stat> {
    let now = unsafe { bpf_ktime_get_ns() };
    let orig = pkt.tuple;
    let xlat = Tuple {
        saddr: orig.saddr,
        daddr: target_addr,
        sport: orig.sport,
        dport: target_port,
    };
    let rev_key = CtKey::new(xlat.reversed(), pkt.proto, dir::UPLINK_EGRESS);
    let rev = entry(orig.reversed(), pkt, ct_kind::DNAT, now, len, false);
    if CONNTRACK.insert(&rev_key, &rev, BPF_ANY as u64).is_err() {
        return Err(Stat::DropCtInsert);
    }
    let fwd = entry(xlat, pkt, ct_kind::DNAT, now, len, true);
    insert_forward(&key(pkt, dir::UPLINK_INGRESS), &fwd, &rev_key)?;
    Ok(xlat)
}

/// Masquerade by address alone, for protocols without ports (GRE, ESP, SCTP...), as
/// netfilter's generic NAT does: one flow per container, protocol and peer. A second
/// container talking the same protocol to the same peer collides: its packets are
/// dropped and counted, never sent with a private source.
#[inline(always)]
pub fn create_addr_only(pkt: &Packet, nat_addr: u32, len: u32) -> Result<Tuple, Stat> {
    let now = unsafe { bpf_ktime_get_ns() };
    let orig = pkt.tuple;
    let xlat = Tuple {
        saddr: nat_addr,
        ..orig
    };
    let rev_key = CtKey::new(xlat.reversed(), pkt.proto, dir::UPLINK_INGRESS);
    let rev = entry(orig.reversed(), pkt, ct_kind::SNAT, now, len, false);
    if CONNTRACK
        .insert(&rev_key, &rev, BPF_NOEXIST as u64)
        .is_err()
    {
        // Another CPU created this very flow (adopt it), or another container owns it.
        match unsafe { CONNTRACK.get(&rev_key) } {
            Some(r) if r.xlat.daddr == orig.saddr => {}
            _ => return Err(Stat::DropProtoCollision),
        }
    }
    let fwd = entry(xlat, pkt, ct_kind::SNAT, now, len, true);
    if CONNTRACK
        .insert(&key(pkt, dir::UPLINK_EGRESS), &fwd, BPF_ANY as u64)
        .is_err()
    {
        return Err(Stat::DropCtInsert);
    }
    stats::inc(Stat::CtCreated);
    Ok(xlat)
}

/// A host socket opens a flow (its first packet leaves) whose replies a container's
/// masquerade entry would take: the container kept its own source port, and the host
/// picked or bound the same port towards the same peer later. The host wins: the
/// container's pair is retired, and its next packet claims a port no host socket
/// holds (the port allocator checks host sockets).
#[inline(always)]
pub fn reclaim_for_host(pkt: &Packet) {
    let opens = match pkt.l4 {
        L4::Ports if pkt.proto == IPPROTO_UDP => true,
        L4::Ports => pkt.l4_flags & (TCP_SYN | TCP_ACK) == TCP_SYN,
        L4::IcmpQuery => icmp_query(pkt.l4_flags) == Some(true),
        _ => false,
    };
    if !opens || pkt.later_fragment {
        return;
    }
    let rev_key = CtKey::new(pkt.tuple.reversed(), pkt.proto, dir::UPLINK_INGRESS);
    let fwd_tuple = match unsafe { CONNTRACK.get(&rev_key) } {
        Some(r) if r.kind == ct_kind::SNAT => r.xlat.reversed(),
        _ => return,
    };
    let fwd_key = CtKey::new(fwd_tuple, pkt.proto, dir::UPLINK_EGRESS);
    let _ = CONNTRACK.remove(&fwd_key);
    let _ = CONNTRACK.remove(&rev_key);
    stats::inc(Stat::CtHostReclaimed);
}
