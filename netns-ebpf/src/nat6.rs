//! IPv6 (`--ip6`): source checks at bridge ports and NAT66 masquerade on the uplink.
//! With the fast path off, IPv6 packets take the host stack's path: the bridge port
//! program checks them, the host routes them, the uplink programs translate. With it
//! on, they bypass the host stack as IPv4 does (`fastpath`): NAT66 at the bridge port
//! and straight to the uplink, and from the uplink into the container's namespace.
//!
//! Do no harm, as for IPv4: the host's own IPv6 (NDP, RAs on the uplink, its own
//! flows and fragments) passes untouched; nothing from outside reaches a container
//! address unless it belongs to a flow; nothing leaves a container with a source that
//! is not its own, and no container answers neighbour discovery for another's address
//! or sends router adverts or redirects.

use aya_ebpf::{bindings::BPF_ANY, programs::TcContext};
use netns_common::{
    BridgePort, Config, Frag6Key, Frag6Xlat, IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP, In6,
    LOOPBACK_IFINDEX, Stat, Tuple6, ct_kind, dir,
};

use crate::{
    conntrack6::{Spec6, create6, lookup6},
    fastpath::{self, Fast},
    ipv6::{
        self, ICMP6_QUOTE, IP6_DADDR_OFF, IP6_HLEN, IP6_SADDR_OFF, IP6H_DADDR, IP6H_SADDR,
        ND_NEIGHBOR_ADVERT, ND_NEIGHBOR_SOLICIT, ND_REDIRECT, ND_ROUTER_ADVERT, Packet6,
        eui64_link_local, is_multicast, parse6, rewrite_addr, rewrite6,
    },
    maps::{CONNTRACK6, ENDPOINTS6, FRAGS6, mark_port_used, port_maybe_ours},
    packet::{self, L4, L4_DPORT, L4_SPORT, TCP_ACK, TCP_SYN},
    portfwd, stats,
};

/// What the IPv6 paths work on, kept off the BPF stack (512 bytes for the whole call
/// chain, which the IPv4 paths' frames share).
pub struct Work6 {
    pkt: Packet6,
    xlat: Tuple6,
    frag: Frag6Key,
    /// The fast path's next-hop MACs.
    macs: fastpath::Macs,
}

#[aya_ebpf::macros::map(name = "NETNS_PKT6SCR")]
static WORK6: aya_ebpf::maps::PerCpuArray<Work6> =
    aya_ebpf::maps::PerCpuArray::with_max_entries(1, 0);

#[inline(always)]
fn ipv6_on(cfg: &Config) -> bool {
    !cfg.subnet6_mask.is_zero()
}

#[inline(always)]
fn in_subnet6(cfg: &Config, a: &In6) -> bool {
    a.in_prefix(&cfg.subnet6, &cfg.subnet6_mask)
}

#[inline(always)]
fn scratch() -> Result<&'static mut Work6, Stat> {
    // SAFETY: per-CPU slot; a program never nests with itself on one CPU.
    WORK6
        .get_ptr_mut(0)
        .map(|p| unsafe { &mut *p })
        .ok_or(Stat::DropMalformed)
}

/// An IPv6 frame arriving from a container on its bridge port: its source must be
/// the container's address, its EUI-64 link-local address, or :: (duplicate address
/// detection); neighbour adverts only for its own addresses, with its own MAC; no
/// router adverts or redirects. What passes goes on to the bridge and the host stack,
/// except hairpin traffic (a port forward reached through a host address), which is
/// translated and sent to the target's bridge port: returns that port's ifindex, or 0,
/// or [`OUTSIDE`] for a container's flow to the outside the fast path may take (the
/// packet parsed in scratch, see [`fast_out6`]).
#[inline(never)]
pub fn port_check6(ctx: &TcContext, cfg: &Config, port: &BridgePort) -> Result<u32, Stat> {
    if !ipv6_on(cfg) || port.addr6.is_zero() {
        return Err(Stat::DropIpv6Off);
    }
    let pkt = &mut scratch()?.pkt;
    parse6(ctx, pkt)?;
    let ll = eui64_link_local(&port.mac);
    let src = pkt.tuple.saddr;
    let own = src == port.addr6 || src == ll;
    let icmp = pkt.proto == IPPROTO_ICMPV6 && !pkt.later_fragment;
    if !own && !(src.is_zero() && icmp) {
        return Err(Stat::DropSpoofedIp);
    }
    if icmp {
        match pkt.l4_flags {
            ND_ROUTER_ADVERT | ND_REDIRECT => return Err(Stat::DropIcmpType),
            ND_NEIGHBOR_ADVERT => {
                let target: In6 = ctx.load(pkt.l4_off + 8).map_err(|_| Stat::DropMalformed)?;
                if target != port.addr6 && target != ll {
                    return Err(Stat::DropSpoofedNd);
                }
                nd_option_mac(ctx, pkt.l4_off + 24, 2, &port.mac)?;
            }
            ND_NEIGHBOR_SOLICIT => nd_option_mac(ctx, pkt.l4_off + 24, 1, &port.mac)?,
            _ => {}
        }
    }
    stats::inc(Stat::PortPassed);
    let d = &pkt.tuple.daddr;
    let to_host = *d == cfg.gateway6 || (*d == cfg.uplink_addr6 && !d.is_zero());
    if !to_host {
        // From its global address only: a link-local or unspecified source is never
        // forwarded (the stack refuses it), let alone masqueraded.
        let outside = cfg.fast_path != 0
            && src == port.addr6
            && !cfg.uplink_addr6.is_zero()
            && matches!(pkt.l4, L4::Ports | L4::IcmpQuery)
            && !pkt.fragment
            && !pkt.icmp_error
            && !in_subnet6(cfg, d)
            && !is_multicast(d);
        return Ok(if outside { OUTSIDE } else { 0 });
    }
    if pkt.l4 != L4::Ports || pkt.later_fragment {
        return Ok(0);
    }
    hairpin6(ctx, cfg)
}

/// What [`port_check6`] returns for a container's packet to the outside.
pub const OUTSIDE: u32 = u32::MAX;

/// The fast path of a container's IPv6 packet to the outside ([`OUTSIDE`]): routed by
/// `bpf_fib_lookup`, masqueraded here (the uplink egress program's NAT66), sent to the
/// uplink. Anything the route lookup does not settle takes the stack.
#[inline(always)]
pub fn fast_out6(ctx: &TcContext, cfg: &Config) -> Result<Fast, Stat> {
    // The MACs in scratch: this frame is under the NAT66 egress path's frames, and the
    // BPF stack is 512 bytes for all of them.
    let w = scratch()?;
    let fast = fastpath::route_out6(ctx, cfg, &w.pkt, &mut w.macs);
    if fast.is_stack() {
        return Ok(Fast::STACK);
    }
    uplink_egress6(ctx, cfg)?;
    Ok(fastpath::finish_out(ctx, fast, &scratch()?.macs, true))
}

/// Hairpin NAT, as for IPv4: destination -> the port forward's target, source -> the
/// gateway with a NAT port, so the target's reply comes back through its own bridge
/// port, where the reverse half undoes both; frames go port to port.
#[inline(never)]
fn hairpin6(ctx: &TcContext, cfg: &Config) -> Result<u32, Stat> {
    let w = scratch()?;
    let pkt = &w.pkt;
    let x = &mut w.xlat;
    let len = ctx.len();
    if lookup6(cfg, pkt, dir::BRIDGE, len, x) == 0 {
        let Some(t) = portfwd::lookup6(&pkt.tuple.daddr, pkt.tuple.dport, pkt.proto) else {
            return Ok(0);
        };
        // Wildcard mappings and ones on the uplink's or the bridge's address; never
        // loopback-only ones.
        if t.ifindex != 0 && t.ifindex != cfg.uplink_ifindex && t.ifindex != cfg.bridge_ifindex {
            return Ok(0);
        }
        *x = Tuple6 {
            saddr: cfg.gateway6,
            daddr: t.addr,
            sport: pkt.tuple.sport,
            dport: t.port,
        };
        let spec = Spec6 {
            fwd_dir: dir::BRIDGE,
            rev_dir: dir::BRIDGE,
            kind: ct_kind::HAIRPIN,
            alloc_port: true,
            owner: pkt.tuple.saddr,
        };
        create6(cfg, pkt, len, &spec, x)?;
    }
    // SAFETY: a valid map value, copied out.
    let Some(ep) = (unsafe { ENDPOINTS6.get(&x.daddr) }).copied() else {
        return Err(Stat::DropNoEndpoint);
    };
    rewrite6(ctx, pkt, x)?;
    packet::set_macs(ctx, &ep.mac, &cfg.bridge_mac)?;
    stats::inc(Stat::Hairpin6Packets);
    Ok(ep.ifindex)
}

/// The first NDP option, if it is a link-layer address option of type `ty` (source 1,
/// target 2), must carry the port's MAC: a forged one would poison neighbour caches.
#[inline(always)]
fn nd_option_mac(ctx: &TcContext, off: usize, ty: u8, mac: &[u8; 6]) -> Result<(), Stat> {
    let Ok(opt) = ctx.load::<[u8; 8]>(off) else {
        return Ok(());
    };
    if opt[0] == ty && opt[1] == 1 && opt[2..8] != mac[..] {
        return Err(Stat::DropSpoofedNd);
    }
    Ok(())
}

/// Uplink egress: masquerade a container's IPv6 packet to the outside (the host
/// routed it here from the bridge).
#[inline(never)]
pub fn uplink_egress6(ctx: &TcContext, cfg: &Config) -> Result<(), Stat> {
    if !ipv6_on(cfg) {
        return Ok(());
    }
    let w = scratch()?;
    w.xlat.saddr = ctx.load(IP6_SADDR_OFF).map_err(|_| Stat::DropMalformed)?;
    w.xlat.daddr = ctx.load(IP6_DADDR_OFF).map_err(|_| Stat::DropMalformed)?;
    let (src, dst) = (&w.xlat.saddr, &w.xlat.daddr);
    if !in_subnet6(cfg, src) || *src == cfg.gateway6 || in_subnet6(cfg, dst) {
        // The host's own (not a container's) IPv6: untouched, whatever it carries.
        return Ok(());
    }
    if cfg.uplink_addr6.is_zero() {
        // Never leak a container's private source: no address to masquerade to.
        return Err(Stat::DropIpv6Off);
    }
    let pkt = &mut w.pkt;
    parse6(ctx, pkt)?;
    let len = ctx.len();
    if pkt.later_fragment {
        // No ports: every masqueraded datagram of a container leaves from the uplink's
        // address, and a later fragment has no checksum to fix.
        rewrite_addr(
            ctx,
            IP6_SADDR_OFF,
            &pkt.tuple.saddr,
            &cfg.uplink_addr6,
            None,
            0,
        )?;
        stats::inc(Stat::Snat6Packets);
        return Ok(());
    }
    if pkt.icmp_error {
        translate_error6(ctx, pkt, dir::UPLINK_EGRESS)?;
        return Ok(());
    }
    let x = &mut w.xlat;
    match pkt.l4 {
        L4::IcmpOther => return Err(Stat::DropIcmpType),
        L4::IcmpQuery if pkt.l4_flags != ipv6::ICMP6_ECHO_REQUEST => {
            // An echo reply or other query with no flow: nothing to translate it by.
            if lookup6(cfg, pkt, dir::UPLINK_EGRESS, len, x) == 0 {
                return Err(Stat::DropIcmpType);
            }
            return rewrite6(ctx, pkt, x).map(|_| stats::inc(Stat::Snat6Packets));
        }
        _ => {}
    }
    let kind = lookup6(cfg, pkt, dir::UPLINK_EGRESS, len, x);
    if kind == 0 {
        *x = Tuple6 {
            saddr: cfg.uplink_addr6,
            ..pkt.tuple
        };
        let spec = Spec6 {
            fwd_dir: dir::UPLINK_EGRESS,
            rev_dir: dir::UPLINK_INGRESS,
            kind: ct_kind::SNAT,
            alloc_port: true,
            owner: pkt.tuple.saddr,
        };
        create6(cfg, pkt, len, &spec, x)?;
        // Replies will come to this port: the uplink must look them up (as IPv4's
        // `create_pair` marks; here, out of `create6`, whose frame is on the bridge
        // port's deepest call chain).
        if pkt.l4 == L4::Ports {
            mark_port_used(x.sport);
        }
    }
    rewrite6(ctx, pkt, x)?;
    stats::inc(if kind == ct_kind::DNAT as u32 {
        Stat::Dnat6ReplyPackets
    } else {
        Stat::Snat6Packets
    });
    Ok(())
}

/// Uplink ingress: replies of NAT66 flows back to their container; nothing else from
/// outside reaches a container address. Returns the container's host veth for the
/// fast path (`bpf_redirect_peer`), 0 for the stack.
#[inline(never)]
pub fn uplink_ingress6(ctx: &TcContext, cfg: &Config) -> Result<u32, Stat> {
    if !ipv6_on(cfg) {
        return Ok(0);
    }
    let w = scratch()?;
    let a = &mut w.xlat;
    a.saddr = ctx.load(IP6_SADDR_OFF).map_err(|_| Stat::DropMalformed)?;
    a.daddr = ctx.load(IP6_DADDR_OFF).map_err(|_| Stat::DropMalformed)?;
    if in_subnet6(cfg, &a.saddr) {
        return Err(Stat::DropInboundSpoofed);
    }
    if in_subnet6(cfg, &a.daddr) && a.daddr != cfg.gateway6 {
        return Err(Stat::DropInbound);
    }
    if cfg.uplink_addr6.is_zero() || a.daddr != cfg.uplink_addr6 || is_multicast(&a.daddr) {
        return Ok(0);
    }
    let pkt = &mut w.pkt;
    if parse6(ctx, pkt).is_err() {
        // To the host's own address: its stack judges its own packets.
        return Ok(0);
    }
    // The host's own TCP and UDP pass before any lookup, as for IPv4 (`host_port`).
    if pkt.l4 == L4::Ports && !pkt.fragment && !port_maybe_ours(cfg, pkt.tuple.dport) {
        stats::inc(Stat::HostPortPassed);
        return Ok(0);
    }
    let len = ctx.len();
    let fk = &mut w.frag;
    fk.saddr = pkt.tuple.saddr;
    fk.daddr = pkt.tuple.daddr;
    fk.id = pkt.frag_id;
    fk.proto = pkt.proto;
    fk._pad = [0; 3];
    if pkt.later_fragment {
        // SAFETY: a valid map value, copied out.
        return match unsafe { FRAGS6.get(fk) } {
            Some(f) => {
                rewrite_addr(ctx, IP6_DADDR_OFF, &pkt.tuple.daddr, &f.addr, None, 0)?;
                stats::inc(Stat::Snat6ReplyPackets);
                Ok(0)
            }
            // The host's own datagram (or one whose first fragment is still to come:
            // the host reassembles nothing of it and drops it in time).
            None => Ok(0),
        };
    }
    if pkt.icmp_error {
        translate_error6(ctx, pkt, dir::UPLINK_INGRESS)?;
        return Ok(0);
    }
    if matches!(pkt.l4, L4::IcmpOther) {
        return Ok(0);
    }
    // A port forward answers on the uplink's address (docker's "0.0.0.0" is every
    // host address; IPv6 mappings on others are not taken from the wire yet).
    let x = &mut w.xlat;
    let kind = lookup6(cfg, pkt, dir::UPLINK_INGRESS, len, x);
    if kind == 0 && !port_forward6(ctx, cfg, pkt, len, x)? {
        return Ok(0);
    }
    rewrite6(ctx, pkt, x)?;
    if pkt.fragment {
        let _ = FRAGS6.insert(fk, &Frag6Xlat { addr: x.daddr }, BPF_ANY as u64);
    }
    stats::inc(if kind == 0 || kind == ct_kind::DNAT as u32 {
        Stat::Dnat6Packets
    } else {
        Stat::Snat6ReplyPackets
    });
    if pkt.fragment {
        return Ok(0);
    }
    Ok(fastpath::to_container6(ctx, cfg, &x.daddr))
}

/// A new flow from outside to a mapped port of the uplink's address: its pair, and
/// `x` what it is rewritten to (the peer keeps its address: the container sees it).
/// False: no mapping, the packet is the host's.
#[inline(always)]
fn port_forward6(
    ctx: &TcContext,
    cfg: &Config,
    pkt: &Packet6,
    len: u32,
    x: &mut Tuple6,
) -> Result<bool, Stat> {
    if pkt.l4 != L4::Ports {
        return Ok(false);
    }
    let Some(t) = portfwd::lookup6(&pkt.tuple.daddr, pkt.tuple.dport, pkt.proto) else {
        return Ok(false);
    };
    // SAFETY: reading a field of the context the kernel handed us.
    let arrived = unsafe { (*ctx.skb.skb).ifindex };
    if t.ifindex == LOOPBACK_IFINDEX || (t.ifindex != 0 && t.ifindex != arrived) {
        return Ok(false);
    }
    // State only for a connection's first segment: anything else to a mapped port
    // with no flow would open a hole for a forged segment.
    if pkt.proto == IPPROTO_TCP && pkt.l4_flags & (TCP_SYN | TCP_ACK) != TCP_SYN {
        return Err(Stat::DropTcpNoState);
    }
    *x = Tuple6 {
        saddr: pkt.tuple.saddr,
        daddr: t.addr,
        sport: pkt.tuple.sport,
        dport: t.port,
    };
    let spec = Spec6 {
        fwd_dir: dir::UPLINK_INGRESS,
        rev_dir: dir::UPLINK_EGRESS,
        kind: ct_kind::DNAT,
        alloc_port: false,
        owner: t.addr,
    };
    create6(cfg, pkt, len, &spec, x)?;
    Ok(true)
}

/// An ICMPv6 error about a NAT66 flow (unreachable, packet too big, time exceeded,
/// parameter problem): the outer address and the quoted header (addresses, ports or
/// echo identifier) are translated with the flow's entry, and the ICMPv6 checksum
/// (which covers the quote and, through the pseudo header, the outer addresses)
/// follows. The quoted packet's own L4 checksum is left as it was (receivers do not
/// check a quote's checksum; Linux's NAT does the same for a truncated quote).
/// At egress the error comes from a container about a reply it got; at ingress from
/// a router or peer about a packet the uplink sent.
#[inline(never)]
fn translate_error6(ctx: &TcContext, pkt: &Packet6, d: u8) -> Result<(), Stat> {
    let q = pkt.l4_off + ICMP6_QUOTE;
    let (Ok(qproto), Ok(saddr), Ok(daddr)) = (
        ctx.load::<u8>(q + 6),
        ctx.load::<In6>(q + IP6H_SADDR),
        ctx.load::<In6>(q + IP6H_DADDR),
    ) else {
        // Too short to quote anything we could translate.
        return untranslatable(d);
    };
    let ql4 = q + IP6_HLEN;
    let mut qt = Tuple6 {
        saddr,
        daddr,
        sport: 0,
        dport: 0,
    };
    match qproto {
        IPPROTO_TCP | IPPROTO_UDP => {
            let ports: [u16; 2] = match ctx.load(ql4 + L4_SPORT) {
                Ok(p) => p,
                Err(_) => return untranslatable(d),
            };
            qt.sport = ports[0];
            qt.dport = ports[1];
        }
        IPPROTO_ICMPV6 => {
            let h: [u8; 8] = match ctx.load(ql4) {
                Ok(h) => h,
                Err(_) => return untranslatable(d),
            };
            let id = u16::from_ne_bytes([h[4], h[5]]);
            match h[0] {
                ipv6::ICMP6_ECHO_REQUEST => qt.sport = id,
                ipv6::ICMP6_ECHO_REPLY => qt.dport = id,
                _ => return untranslatable(d),
            }
        }
        _ => return untranslatable(d),
    }
    // The quoted packet went the other way: its reverse is a packet of the flow
    // seen at this hook.
    let k = netns_common::Ct6Key::new(qt.reversed(), qproto, d);
    // SAFETY: a valid map value, copied out.
    let Some(e) = (unsafe { CONNTRACK6.get(&k) }) else {
        return untranslatable(d);
    };
    let nq = e.xlat.reversed();
    let csum = pkt.l4_off + 2;
    // Outer: at egress the source (the container -> the uplink), at ingress the
    // destination (the uplink -> the container); pseudo header.
    if d == dir::UPLINK_EGRESS {
        rewrite_addr(
            ctx,
            IP6_SADDR_OFF,
            &pkt.tuple.saddr,
            &nq.daddr,
            Some(csum),
            aya_ebpf::bindings::BPF_F_PSEUDO_HDR as u64,
        )?;
    } else {
        rewrite_addr(
            ctx,
            IP6_DADDR_OFF,
            &pkt.tuple.daddr,
            &nq.saddr,
            Some(csum),
            aya_ebpf::bindings::BPF_F_PSEUDO_HDR as u64,
        )?;
    }
    // Quoted: plain data under the ICMPv6 checksum.
    rewrite_addr(ctx, q + IP6H_SADDR, &qt.saddr, &nq.saddr, Some(csum), 0)?;
    rewrite_addr(ctx, q + IP6H_DADDR, &qt.daddr, &nq.daddr, Some(csum), 0)?;
    if qproto == IPPROTO_ICMPV6 {
        let (o, n) = if qt.sport != 0 || nq.sport != 0 {
            (qt.sport, nq.sport)
        } else {
            (qt.dport, nq.dport)
        };
        if o != n {
            ctx.l4_csum_replace(csum, o as u64, n as u64, 2)
                .map_err(|_| Stat::DropCsumHelper)?;
            ctx.store(ql4 + ipv6::ICMP6_ID, &n, 0)
                .map_err(|_| Stat::DropCsumHelper)?;
        }
    } else {
        for (off, o, n) in [
            (ql4 + L4_SPORT, qt.sport, nq.sport),
            (ql4 + L4_DPORT, qt.dport, nq.dport),
        ] {
            if o != n {
                ctx.l4_csum_replace(csum, o as u64, n as u64, 2)
                    .map_err(|_| Stat::DropCsumHelper)?;
                ctx.store(off, &n, 0).map_err(|_| Stat::DropCsumHelper)?;
            }
        }
    }
    stats::inc(Stat::Icmp6Errors);
    Ok(())
}

/// An error that quotes nothing of a NAT66 flow: from a container it must not leave
/// with its private source; from outside it is the host's.
#[inline(always)]
fn untranslatable(d: u8) -> Result<(), Stat> {
    if d == dir::UPLINK_EGRESS {
        Err(Stat::DropIcmpType)
    } else {
        Ok(())
    }
}
