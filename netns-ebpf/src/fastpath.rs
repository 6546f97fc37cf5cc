//! The fast path (`--fast-path on`): packets the datapath translates skip the host's
//! bridge, IP forwarding, netfilter and backlog queue. From the uplink a packet for a
//! container is delivered into the container's namespace (`bpf_redirect_peer`); from
//! a container it is translated at its bridge port and sent to the uplink with the
//! next hop `bpf_fib_lookup` found (`bpf_redirect_neigh` when the neighbour is not
//! resolved yet); between containers it goes to the other container's veth peer.
//! Anything the lookup cannot settle (no route via the uplink, a packet too big for
//! its MTU, TTL about to expire) takes the stack's path, which answers with the right
//! ICMP error. IPv6 (NAT66) takes the same paths, with the hop limit for the TTL.

use aya_ebpf::{
    bindings::{BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS, bpf_fib_lookup},
    helpers::bpf_fib_lookup as fib_lookup,
    programs::TcContext,
};
use netns_common::{Config, In6, Stat};

use crate::{
    ipv6::{IP6_HLEN, Ip6Hdr, Packet6},
    maps::{ENDPOINTS, ENDPOINTS6},
    mem,
    packet::{self, ETH_HLEN, Ipv4Hdr},
    stats::{self, Verdict},
};

/// `skb->mark` of a packet the fast path already translated and sent to the uplink:
/// the uplink's egress program passes it untouched (and clears the mark).
pub const MARK: u32 = 0x6e65_7473;

const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;

/// Where the fast path sends a packet: its kind above the ifindex in one scalar,
/// [`Fast::STACK`] for the stack's path. Not an enum: LLVM moves an enum's payload
/// register even on the paths where it was never set, which the verifier refuses.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Fast(u64);

impl Fast {
    /// Not redirected: the packet goes on through the host's stack.
    pub const STACK: Fast = Fast(0);
    const PEER: u64 = 1;
    const OUT: u64 = 2;
    const NEIGH: u64 = 3;

    /// Into the namespace of the container behind this host veth.
    pub fn peer(ifindex: u32) -> Self {
        Fast((Self::PEER << 32) | ifindex as u64)
    }

    /// Out of this interface, MACs already set.
    pub fn out(ifindex: u32) -> Self {
        Fast((Self::OUT << 32) | ifindex as u64)
    }

    /// Out of this interface, the kernel resolves the next hop's MAC.
    pub fn neigh(ifindex: u32) -> Self {
        Fast((Self::NEIGH << 32) | ifindex as u64)
    }

    pub fn is_stack(self) -> bool {
        self.0 == 0
    }

    /// The raw scalar, to pass across a call.
    pub fn raw(self) -> u64 {
        self.0
    }

    pub fn from_raw(raw: u64) -> Self {
        Fast(raw)
    }

    pub fn verdict(self) -> Verdict {
        let ifindex = self.0 as u32;
        match self.0 >> 32 {
            Self::PEER => Verdict::RedirectPeer(ifindex),
            Self::OUT => Verdict::Redirect(ifindex),
            Self::NEIGH => Verdict::RedirectNeigh(ifindex),
            _ => Verdict::Pass,
        }
    }
}

/// Uplink ingress, after translation: a packet now addressed to a container goes
/// straight into its namespace.
#[inline(always)]
pub fn to_container(ctx: &TcContext, cfg: &Config, daddr: u32) -> Fast {
    if cfg.fast_path == 0 {
        return Fast::STACK;
    }
    // SAFETY: a valid map value, copied out.
    let Some(ep) = (unsafe { ENDPOINTS.get(&daddr) }).copied() else {
        return Fast::STACK;
    };
    if packet::set_macs(ctx, &ep.mac, &cfg.bridge_mac).is_err() || !packet::dec_ttl(ctx) {
        return Fast::STACK;
    }
    stats::inc(Stat::FastIn);
    Fast::peer(ep.ifindex)
}

/// Uplink ingress, IPv6, after NAT66: the same for a packet now addressed to a
/// container's IPv6 address. Returns its host veth's ifindex, 0 for the stack.
#[inline(always)]
pub fn to_container6(ctx: &TcContext, cfg: &Config, daddr: &In6) -> u32 {
    if cfg.fast_path == 0 {
        return 0;
    }
    // SAFETY: a valid map value, copied out.
    let Some(ep) = (unsafe { ENDPOINTS6.get(daddr) }).copied() else {
        return 0;
    };
    if packet::set_macs(ctx, &ep.mac, &cfg.bridge_mac).is_err() || !dec_hop_limit(ctx) {
        return 0;
    }
    stats::inc(Stat::FastIn);
    ep.ifindex
}

/// Decrements the IPv6 hop limit (IPv6 has no header checksum). False (nothing
/// changed) when it would expire: the stack sends the time-exceeded error then.
#[inline(always)]
fn dec_hop_limit(ctx: &TcContext) -> bool {
    let Some(ip) = packet::Frame::at(ctx).ptr::<Ip6Hdr>(ETH_HLEN) else {
        return false;
    };
    // SAFETY: bounds checked by `ptr`.
    unsafe {
        if (*ip).hop_limit <= 1 {
            return false;
        }
        (*ip).hop_limit -= 1;
    }
    true
}

/// A container's packet to another container on the bridge (addressed to its MAC):
/// straight to that container's veth peer.
#[inline(always)]
pub fn to_neighbour(cfg: &Config, dst_mac: &[u8; 6], daddr: u32) -> Fast {
    if cfg.fast_path == 0 {
        return Fast::STACK;
    }
    // SAFETY: a valid map value.
    let Some(ep) = (unsafe { ENDPOINTS.get(&daddr) }) else {
        return Fast::STACK;
    };
    if ep.mac != *dst_mac {
        return Fast::STACK;
    }
    stats::inc(Stat::FastLocal);
    Fast::peer(ep.ifindex)
}

/// The next hop's and the uplink's MACs, as the Ethernet header starts (aligned for
/// [`mem::zeroed`]).
#[repr(C, align(4))]
pub struct Macs(pub [u8; 12]);

/// The route of a container's packet to the gateway: the uplink and the next hop's
/// MACs, or None when the stack must handle it (another interface, fragmentation
/// needed, no route, TTL expiring).
/// A function of its own: the lookup's parameter block stays off the caller's stack.
#[inline(never)]
pub fn route_out(ctx: &TcContext, cfg: &Config, ip: &Ipv4Hdr, macs: &mut Macs) -> Fast {
    if cfg.fast_path == 0 || ip.ttl <= 1 {
        return Fast::STACK;
    }
    let l4_off = ETH_HLEN + ((ip.vihl & 0x0f) as usize) * 4;
    let tot_len = wire_len(ctx, u16::from_be(ip.tot_len), l4_off, ip.proto);
    fib_out(ctx, cfg, macs, |p| {
        p.family = AF_INET;
        p.l4_protocol = ip.proto;
        p.__bindgen_anon_1.tot_len = tot_len;
        p.__bindgen_anon_2.tos = ip.tos;
        p.__bindgen_anon_3.ipv4_src = ip.saddr;
        p.__bindgen_anon_4.ipv4_dst = ip.daddr;
    })
}

/// [`route_out`] for a container's IPv6 packet (`pkt`, parsed).
#[inline(never)]
pub fn route_out6(ctx: &TcContext, cfg: &Config, pkt: &Packet6, macs: &mut Macs) -> Fast {
    let Some(ip) = packet::Frame::at(ctx).get::<Ip6Hdr>(ETH_HLEN) else {
        return Fast::STACK;
    };
    if cfg.fast_path == 0 || ip.hop_limit <= 1 {
        return Fast::STACK;
    }
    let tot = (IP6_HLEN as u32 + pkt.payload_len).min(u16::MAX as u32) as u16;
    let tot_len = wire_len(ctx, tot, pkt.l4_off, pkt.proto);
    fib_out(ctx, cfg, macs, |p| {
        p.family = AF_INET6;
        p.l4_protocol = pkt.proto;
        p.__bindgen_anon_1.tot_len = tot_len;
        // Traffic class and flow label, as the kernel's forwarding looks them up.
        let v = ip.vtc_flow;
        p.__bindgen_anon_2.flowinfo = u32::from_ne_bytes([v[0] & 0x0f, v[1], v[2], v[3]]);
        p.__bindgen_anon_3.ipv6_src = ip.saddr.0;
        p.__bindgen_anon_4.ipv6_dst = ip.daddr.0;
    })
}

/// `bpf_fib_lookup` from the bridge with the members `fill` sets (the rest zero):
/// out of the uplink with the looked-up MACs, through the kernel's neighbour
/// resolution when the next hop has no entry yet, or the stack's path.
#[inline(always)]
fn fib_out(
    ctx: &TcContext,
    cfg: &Config,
    macs: &mut Macs,
    fill: impl FnOnce(&mut bpf_fib_lookup),
) -> Fast {
    let mut p = core::mem::MaybeUninit::<bpf_fib_lookup>::uninit();
    mem::zero_in_place(p.as_mut_ptr());
    // SAFETY: every byte written just above; all-zero is a valid bpf_fib_lookup.
    let p = unsafe { &mut *p.as_mut_ptr() };
    p.ifindex = cfg.bridge_ifindex;
    fill(p);
    // SAFETY: helper call with a valid context and parameter block.
    let rc = unsafe {
        fib_lookup(
            ctx.skb.skb.cast(),
            p,
            core::mem::size_of::<bpf_fib_lookup>() as i32,
            0,
        )
    } as u32;
    if p.ifindex != cfg.uplink_ifindex {
        return Fast::STACK;
    }
    macs.0[..6].copy_from_slice(&p.dmac);
    macs.0[6..].copy_from_slice(&p.smac);
    match rc {
        BPF_FIB_LKUP_RET_SUCCESS => Fast::out(p.ifindex),
        BPF_FIB_LKUP_RET_NO_NEIGH => Fast::neigh(p.ifindex),
        _ => Fast::STACK,
    }
}

/// The length of the packets that will be on the wire (`tot`: the IP packet's): a
/// GSO packet (a container's TCP sends 64 KiB at a time) is checked by the size of its
/// segments (IP headers up to `l4_off`, the L4 header, one segment), as the kernel's
/// forwarding does, not by its total length.
#[inline(always)]
fn wire_len(ctx: &TcContext, tot: u16, l4_off: usize, proto: u8) -> u16 {
    // SAFETY: reading fields of the context the kernel handed us.
    let (segs, size) = unsafe { ((*ctx.skb.skb).gso_segs, (*ctx.skb.skb).gso_size) };
    if segs <= 1 || size == 0 {
        return tot;
    }
    let l4 = if proto == netns_common::IPPROTO_TCP {
        match ctx.load::<u8>(l4_off + 12) {
            Ok(doff) => ((doff >> 4) as u32) * 4,
            Err(_) => return tot,
        }
    } else {
        8
    };
    let seg = (l4_off - ETH_HLEN) as u32 + l4 + size;
    if seg < tot as u32 { seg as u16 } else { tot }
}

/// After the packet was translated: the MACs, the TTL (hop limit for `v6`), the mark.
#[inline(always)]
pub fn finish_out(ctx: &TcContext, fast: Fast, macs: &Macs, v6: bool) -> Fast {
    // Marked first: translated, it must not be translated again at the uplink, even
    // if it falls back to the stack below.
    // SAFETY: writing a field of the context the kernel handed us (writable in TC).
    unsafe { (*ctx.skb.skb).mark = MARK };
    if fast.0 >> 32 == Fast::OUT {
        let Some(p) = packet::Frame::at(ctx).ptr::<[u8; 12]>(0) else {
            return Fast::STACK;
        };
        // SAFETY: bounds checked by `ptr`.
        unsafe { *p = macs.0 };
    }
    if !(if v6 {
        dec_hop_limit(ctx)
    } else {
        packet::dec_ttl(ctx)
    }) {
        return Fast::STACK;
    }
    stats::inc(Stat::FastOut);
    fast
}
