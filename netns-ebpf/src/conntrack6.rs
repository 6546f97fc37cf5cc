//! IPv6 conntrack (`NETNS_CT6`): the pairs of NAT66 flows. Simpler than IPv4's: one
//! LRU table, a half the LRU lost is rebuilt from its partner on the egress packet
//! that finds it missing, and the source port always comes from the NAT range
//! (reserved for netns on the host, `net.ipv4.ip_local_reserved_ports` covering IPv6
//! sockets too), so a NAT66 flow can never take a port a host socket uses.

use aya_ebpf::bindings::BPF_NOEXIST;
use netns_common::{
    Config, Ct6Entry, Ct6Key, IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP, Stat, Tuple6,
    ct_flags, ct_kind, ct_state, dir,
};

use crate::{
    conntrack::{next_tcp_state, now_ns, timeout_ns},
    ipv6::Packet6,
    maps::CONNTRACK6,
    packet::TCP_SYN,
    stats,
};

/// Ports tried in the NAT range before the drop is counted (`drop_port_exhausted`).
const PORT_PROBES: u32 = 16;
const LAST_SEEN_GRANULE_NS: u64 = 1_000_000_000;

/// Per-CPU room for the two halves of a pair being made (off the 512-byte stack).
#[aya_ebpf::macros::map(name = "NETNS_CT6SCR")]
static CT6_SCRATCH: aya_ebpf::maps::PerCpuArray<Ct6Entry> =
    aya_ebpf::maps::PerCpuArray::with_max_entries(2, 0);

#[inline(always)]
fn scratch(slot: u32) -> Option<&'static mut Ct6Entry> {
    // SAFETY: per-CPU slot; the programs never nest on one CPU.
    CT6_SCRATCH.get_ptr_mut(slot).map(|p| unsafe { &mut *p })
}

#[inline(always)]
pub fn key6(pkt: &Packet6, d: u8) -> Ct6Key {
    Ct6Key::new(pkt.tuple, pkt.proto, d)
}

/// ICMPv6 flows time out as ICMP ones.
#[inline(always)]
fn timeout_proto(proto: u8) -> u8 {
    if proto == IPPROTO_ICMPV6 {
        IPPROTO_ICMP
    } else {
        proto
    }
}

#[inline(always)]
fn expired(cfg: &Config, proto: u8, e: &Ct6Entry, now: u64) -> bool {
    let t = timeout_ns(cfg, timeout_proto(proto), e.state, e.flags);
    t != 0 && now.saturating_sub(e.last_seen_ns) > t
}

/// Looks up the half of `pkt` at hook `d`; on a hit updates both halves (state,
/// reply seen, time, counters) and writes the translation to `xlat`. An expired pair
/// is removed and missed. At egress a lost partner is rebuilt.
#[inline(never)]
pub fn lookup6(cfg: &Config, pkt: &Packet6, d: u8, len: u32, xlat: &mut Tuple6) -> bool {
    let k = key6(pkt, d);
    let Some(e) = CONNTRACK6.get_ptr_mut(&k) else {
        return false;
    };
    let now = now_ns();
    // SAFETY: a valid map value; racing writers of one flow only lose an update of a
    // counter or a time, which the next packet writes again.
    let e = unsafe { &mut *e };
    let pk = e.partner_key(&k);
    if expired(cfg, pkt.proto, e, now) {
        // The partner may have seen traffic the other way: a pair lives while either
        // half does.
        let partner_live = match unsafe { CONNTRACK6.get(&pk) } {
            Some(p) => !expired(cfg, pkt.proto, p, now),
            None => false,
        };
        if !partner_live {
            let _ = CONNTRACK6.remove(&k);
            let _ = CONNTRACK6.remove(&pk);
            stats::inc(Stat::CtExpired);
            return false;
        }
    }
    let fwd = e.flags & ct_flags::FWD != 0;
    let mut state = e.state;
    if pkt.proto == IPPROTO_TCP && !pkt.later_fragment {
        state = next_tcp_state(state, pkt.l4_flags);
    }
    let mut flags = e.flags;
    if !fwd {
        flags |= ct_flags::REPLIED;
        if pkt.proto == IPPROTO_UDP {
            flags |= ct_flags::STREAM;
        }
    }
    let touch = now.saturating_sub(e.last_seen_ns) >= LAST_SEEN_GRANULE_NS;
    if touch {
        e.last_seen_ns = now;
    }
    if cfg.ct_counters != 0 {
        e.packets += 1;
        e.bytes += len as u64;
    }
    *xlat = e.xlat;
    let changed = state != e.state || flags != e.flags;
    if changed {
        e.state = state;
        e.flags = flags;
    }
    if changed || touch || d == dir::UPLINK_EGRESS {
        match CONNTRACK6.get_ptr_mut(&pk) {
            Some(p) => {
                // SAFETY: as above.
                let p = unsafe { &mut *p };
                p.state = state;
                p.flags = (p.flags & ct_flags::FWD) | (flags & !ct_flags::FWD);
            }
            None if d == dir::UPLINK_EGRESS => {
                // Evicted: rebuild it, the flow's replies need it.
                if let Some(p) = scratch(0) {
                    *p = *e;
                    p.xlat = k.tuple.reversed();
                    p.flags &= !ct_flags::FWD;
                    if CONNTRACK6.insert(&pk, &*p, BPF_NOEXIST as u64).is_ok() {
                        stats::inc(Stat::CtRebuilt);
                    }
                }
            }
            None => {}
        }
    }
    true
}

/// The `i`-th NAT port to try for `t`: a keyed hash (not guessable from outside).
#[inline(always)]
fn probe_port6(seed: u32, t: &Tuple6, i: u32, min: u16, span: u32) -> u16 {
    let mut h = seed ^ i.wrapping_mul(0x9e37_79b9);
    let words = [
        t.saddr.0[0] ^ t.saddr.0[1] ^ t.saddr.0[2] ^ t.saddr.0[3],
        t.daddr.0[0] ^ t.daddr.0[1] ^ t.daddr.0[2] ^ t.daddr.0[3],
        ((t.sport as u32) << 16) | t.dport as u32,
    ];
    for w in words {
        h ^= w;
        h = h.wrapping_mul(0x85eb_ca6b);
        h ^= h >> 13;
        h = h.wrapping_mul(0xc2b2_ae35);
        h ^= h >> 16;
    }
    (min as u32 + h % span) as u16
}

/// Masquerades a new flow of a container: source -> the uplink's IPv6 address and a
/// NAT port no other flow to the same peer holds. Claims the port by inserting the
/// reverse half with BPF_NOEXIST, then the forward half; writes the new tuple.
#[inline(never)]
pub fn create6(cfg: &Config, pkt: &Packet6, len: u32, xlat: &mut Tuple6) -> Result<(), Stat> {
    let orig = pkt.tuple;
    let now = now_ns();
    let state = if pkt.proto == IPPROTO_TCP && pkt.l4_flags & TCP_SYN == 0 {
        // Picked up mid-stream (its pair was lost).
        ct_state::ESTABLISHED
    } else {
        ct_state::NEW
    };
    let (packets, bytes) = if cfg.ct_counters != 0 {
        (1, len as u64)
    } else {
        (0, 0)
    };
    let mut new = Tuple6 {
        saddr: cfg.uplink_addr6,
        daddr: orig.daddr,
        sport: orig.sport,
        dport: orig.dport,
    };
    let (Some(rev), Some(fwd)) = (scratch(0), scratch(1)) else {
        return Err(Stat::DropCtInsert);
    };
    *rev = Ct6Entry {
        xlat: orig.reversed(),
        state,
        kind: ct_kind::SNAT,
        flags: 0,
        _pad: 0,
        created_ns: now,
        last_seen_ns: now,
        packets: 0,
        bytes: 0,
        owner: orig.saddr,
    };
    let span = (cfg.nat_port_max as u32).saturating_sub(cfg.nat_port_min as u32) + 1;
    let mut i = 0;
    let mut claimed = false;
    let mut rk = Ct6Key::new(new.reversed(), pkt.proto, dir::UPLINK_INGRESS);
    while !claimed && i < PORT_PROBES {
        let port = probe_port6(cfg.port_seed, &orig, i, cfg.nat_port_min, span).to_be();
        // Echo too: the identifier is the request's `sport`, the reply's `dport`.
        new.sport = port;
        rk.tuple = new.reversed();
        if CONNTRACK6.get_ptr(&rk).is_none()
            && CONNTRACK6.insert(&rk, &*rev, BPF_NOEXIST as u64).is_ok()
        {
            claimed = true;
        } else {
            i += 1;
        }
    }
    if !claimed {
        return Err(Stat::DropPortExhausted);
    }
    if i > 0 {
        stats::inc(match i {
            1 => Stat::PortRetries1,
            2..=3 => Stat::PortRetries2To3,
            4..=7 => Stat::PortRetries4To7,
            _ => Stat::PortRetries8To16,
        });
    }
    *fwd = *rev;
    fwd.xlat = new;
    fwd.flags = ct_flags::FWD;
    fwd.packets = packets;
    fwd.bytes = bytes;
    let fk = key6(pkt, dir::UPLINK_EGRESS);
    if CONNTRACK6.insert(&fk, &*fwd, BPF_NOEXIST as u64).is_err() {
        // Another CPU made this flow's pair meanwhile: use its translation.
        let _ = CONNTRACK6.remove(&rk);
        return match unsafe { CONNTRACK6.get(&fk) } {
            Some(e) => {
                *xlat = e.xlat;
                Ok(())
            }
            None => Err(Stat::DropCtInsert),
        };
    }
    stats::inc(Stat::Ct6Created);
    *xlat = new;
    Ok(())
}
