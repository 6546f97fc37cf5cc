//! IPv6 conntrack (`NETNS_CT6`): the pairs of NAT66, port-forward and hairpin flows.
//! Simpler than IPv4's: one LRU table; a half the LRU lost is rebuilt from its
//! partner on the container-side packet that finds it missing; a masqueraded source
//! port always comes from the NAT range (reserved for netns on the host,
//! `net.ipv4.ip_local_reserved_ports` covering IPv6 sockets too), so a NAT66 flow
//! never takes a port a host socket uses.

use aya_ebpf::bindings::BPF_NOEXIST;
use netns_common::{
    Config, Ct6Entry, Ct6Key, IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP, In6, Stat,
    Tuple6, ct_flags, ct_state, dir,
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

/// And for their keys: the callers' frames leave little of the stack.
#[aya_ebpf::macros::map(name = "NETNS_CT6KSCR")]
static CT6_KEY_SCRATCH: aya_ebpf::maps::PerCpuArray<Ct6Key> =
    aya_ebpf::maps::PerCpuArray::with_max_entries(2, 0);

#[inline(always)]
fn scratch(slot: u32) -> Option<&'static mut Ct6Entry> {
    // SAFETY: per-CPU slot; the programs never nest on one CPU.
    CT6_SCRATCH.get_ptr_mut(slot).map(|p| unsafe { &mut *p })
}

#[inline(always)]
fn key_scratch(slot: u32) -> Option<&'static mut Ct6Key> {
    // SAFETY: as for `scratch`.
    CT6_KEY_SCRATCH
        .get_ptr_mut(slot)
        .map(|p| unsafe { &mut *p })
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
/// reply seen, time, counters), writes the translation to `xlat` and returns the
/// pair's [`ct_kind`](netns_common::ct_kind) (0: no live flow). An expired pair is
/// removed and missed. A lost partner is rebuilt (except at uplink ingress: what
/// arrives there may be anyone's).
#[inline(never)]
pub fn lookup6(cfg: &Config, pkt: &Packet6, d: u8, len: u32, xlat: &mut Tuple6) -> u32 {
    let k = key6(pkt, d);
    let Some(e) = CONNTRACK6.get_ptr_mut(&k) else {
        return 0;
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
            return 0;
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
    let rebuild = d != dir::UPLINK_INGRESS;
    if changed || touch || rebuild {
        match CONNTRACK6.get_ptr_mut(&pk) {
            Some(p) => {
                // SAFETY: as above.
                let p = unsafe { &mut *p };
                p.state = state;
                p.flags = (p.flags & ct_flags::FWD) | (flags & !ct_flags::FWD);
            }
            None if rebuild => {
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
    e.kind as u32
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

/// How a new pair is made: the hook points of its halves, its kind, and whether the
/// new tuple's source port is picked from the NAT range (masquerade, hairpin) or kept
/// (port forward: the peer's own port).
pub struct Spec6 {
    pub fwd_dir: u8,
    pub rev_dir: u8,
    pub kind: u8,
    pub alloc_port: bool,
    /// The container the flow belongs to.
    pub owner: In6,
}

/// Makes the pair that rewrites `pkt` to `xlat` (its source port chosen here when
/// `spec.alloc_port`): claims the reply tuple by inserting the reverse half with
/// BPF_NOEXIST, then inserts the forward half. If another CPU made this flow's pair
/// meanwhile, its translation is taken.
#[inline(never)]
pub fn create6(
    cfg: &Config,
    pkt: &Packet6,
    len: u32,
    spec: &Spec6,
    xlat: &mut Tuple6,
) -> Result<(), Stat> {
    let orig = &pkt.tuple;
    let now = now_ns();
    let state = if pkt.proto == IPPROTO_TCP && pkt.l4_flags & TCP_SYN == 0 {
        // Picked up mid-stream (its pair was lost).
        ct_state::ESTABLISHED
    } else {
        ct_state::NEW
    };
    let (Some(rev), Some(fwd), Some(rk), Some(fk)) =
        (scratch(0), scratch(1), key_scratch(0), key_scratch(1))
    else {
        return Err(Stat::DropCtInsert);
    };
    // Field by field: a whole-struct literal would be built on the stack first.
    rev.xlat = orig.reversed();
    rev.state = state;
    rev.kind = spec.kind;
    rev.flags = 0;
    rev._pad = 0;
    rev.created_ns = now;
    rev.last_seen_ns = now;
    rev.packets = 0;
    rev.bytes = 0;
    rev.owner = spec.owner;
    let span = (cfg.nat_port_max as u32).saturating_sub(cfg.nat_port_min as u32) + 1;
    *rk = Ct6Key::new(xlat.reversed(), pkt.proto, spec.rev_dir);
    let mut i = 0;
    let mut claimed = false;
    let probes = if spec.alloc_port { PORT_PROBES } else { 1 };
    while !claimed && i < probes {
        if spec.alloc_port {
            // Echo too: the identifier is the request's `sport`, the reply's `dport`.
            xlat.sport = probe_port6(cfg.port_seed, orig, i, cfg.nat_port_min, span).to_be();
            rk.tuple = xlat.reversed();
        }
        if CONNTRACK6.get_ptr(&*rk).is_none()
            && CONNTRACK6.insert(&*rk, &*rev, BPF_NOEXIST as u64).is_ok()
        {
            claimed = true;
        } else {
            i += 1;
        }
    }
    if !claimed {
        return Err(if spec.alloc_port {
            Stat::DropPortExhausted
        } else {
            Stat::DropCtInsert
        });
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
    fwd.xlat = *xlat;
    fwd.flags = ct_flags::FWD;
    if cfg.ct_counters != 0 {
        fwd.packets = 1;
        fwd.bytes = len as u64;
    }
    *fk = key6(pkt, spec.fwd_dir);
    if CONNTRACK6.insert(&*fk, &*fwd, BPF_NOEXIST as u64).is_err() {
        let _ = CONNTRACK6.remove(&*rk);
        // SAFETY: a valid map value, copied out.
        return match unsafe { CONNTRACK6.get(&*fk) } {
            Some(e) => {
                *xlat = e.xlat;
                Ok(())
            }
            None => Err(Stat::DropCtInsert),
        };
    }
    stats::inc(Stat::Ct6Created);
    Ok(())
}
