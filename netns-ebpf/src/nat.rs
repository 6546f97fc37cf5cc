//! The three TC programs' logic: masquerade and port-forward translation on the uplink,
//! source validation and hairpin on bridge ports.
//!
//! Do no harm: the host's own traffic is never changed or dropped unless it belongs to
//! a translated flow; nothing from outside reaches a container address unless it
//! belongs to a flow, a port forward or an `--allow-inbound` source; nothing leaves a
//! container with a private source or a foreign MAC.

use aya_ebpf::{bindings::BPF_ANY, programs::TcContext};
use netns_common::{
    BridgePort, Config, FragKey, FragPorts, IPPROTO_ICMP, PortTarget, Stat, Tuple, ct_kind, dir,
};

use crate::{
    conntrack::{self, Lookup},
    fastpath::{self, Fast},
    frag, icmp,
    ipv6::ETH_P_IPV6,
    maps::{BRIDGE_PORTS, ENDPOINTS, FRAGS, config, inbound_allowed, port_maybe_ours, routed_dest},
    mem, nat6,
    packet::{
        self, ETH_HLEN, EthHdr, Frame, ICMP_REDIRECT, ICMP_ROUTER_ADVERT, Ipv4Hdr, Kind, L4, Packet,
    },
    portfwd,
    stats::{self, Verdict},
};

const ETH_P_IP: u16 = 0x0800;

/// Room for the packet the hairpin and egress paths parse (they never nest on a CPU).
#[aya_ebpf::macros::map(name = "NETNS_PKTSCR")]
static PKT_SCRATCH: aya_ebpf::maps::PerCpuArray<Packet> =
    aya_ebpf::maps::PerCpuArray::with_max_entries(1, 0);
const ETH_P_ARP: u16 = 0x0806;

#[inline(always)]
fn into_verdict(r: Result<(), Stat>) -> Verdict {
    match r {
        Ok(()) => Verdict::Pass,
        Err(s) => Verdict::Drop(s),
    }
}

#[inline(always)]
fn in_subnet(cfg: &Config, addr: u32) -> bool {
    addr & cfg.subnet_mask == cfg.subnet
}

/// What leaving through the uplink means for a packet.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Leaving {
    /// Not a container's packet to the outside (the host's, the gateway's, or one
    /// addressed back into the subnet): untouched.
    NotOurs,
    /// A container's packet to a `--no-masquerade` (or `--allow-inbound`) destination:
    /// routed with its own address, no flow.
    Routed,
    /// A container's packet to the outside: masqueraded.
    Masquerade,
}

#[inline(always)]
fn leaving(cfg: &Config, t: &Tuple) -> Leaving {
    if !in_subnet(cfg, t.saddr) || t.saddr == cfg.gateway || in_subnet(cfg, t.daddr) {
        Leaving::NotOurs
    } else if routed_dest(cfg, t.daddr) {
        Leaving::Routed
    } else {
        Leaving::Masquerade
    }
}

/// False, counting it, for a packet [`leaving`] says is routed untranslated.
#[inline(always)]
fn masquerades(cfg: &Config, t: &Tuple) -> bool {
    match leaving(cfg, t) {
        Leaving::Masquerade => true,
        Leaving::Routed => {
            stats::inc(Stat::NomasqOut);
            false
        }
        Leaving::NotOurs => false,
    }
}

#[inline(always)]
fn is_loopback(addr: u32) -> bool {
    u32::from_be(addr) >> 24 == 127
}

#[inline(always)]
fn is_ipv6(ctx: &TcContext) -> bool {
    Frame::at(ctx)
        .get::<u16>(packet::ETH_PROTO_OFF)
        .is_some_and(|p| u16::from_be(p) == ETH_P_IPV6)
}

#[inline(always)]
fn skb_ifindex(ctx: &TcContext) -> u32 {
    // SAFETY: reading a field of the context the kernel handed us.
    unsafe { (*ctx.skb.skb).ifindex }
}

#[inline(always)]
fn frag_key(pkt: &Packet) -> FragKey {
    FragKey {
        saddr: pkt.tuple.saddr,
        daddr: pkt.tuple.daddr,
        id: pkt.ip_id,
        proto: pkt.proto,
        _pad: 0,
    }
}

/// Is this TCP or UDP packet through the uplink, by its host-side `port`, the host's
/// own for certain (counted)? Only whole datagrams: fragments need their entries.
#[inline(always)]
fn host_port(cfg: &Config, pkt: &Packet, port: u16) -> bool {
    if pkt.l4 != L4::Ports || pkt.later_fragment || pkt.first_fragment {
        return false;
    }
    if port_maybe_ours(cfg, port) {
        return false;
    }
    stats::inc(Stat::HostPortPassed);
    true
}

/// What the fragment cache knows about a later fragment's datagram.
enum FragInfo {
    /// A translated datagram: the ports are filled in.
    Ours,
    /// The host's own datagram.
    Host,
    Unknown,
}

/// Counts a later fragment's bytes to its datagram's entry, and ends the entry once
/// every byte up to the last fragment's end has passed (fragments may come in any
/// order: the last one is not always the last to arrive).
#[inline(always)]
fn frag_account(k: &FragKey, p: *mut FragPorts, pkt: &Packet) {
    // SAFETY: a valid map value; racing updates only delay or hasten the removal,
    // and a datagram's fragments are almost always handled on one CPU.
    let done = unsafe {
        (*p).seen += pkt.l3_payload;
        if pkt.last_fragment {
            (*p).total = pkt.frag_end;
        }
        (*p).total != 0 && (*p).seen >= (*p).total
    };
    if done {
        let _ = FRAGS.remove(k);
    }
}

/// Later fragments carry no ports: take them from the first fragment of the datagram.
#[inline(never)]
fn frag_ports(pkt: &mut Packet) -> FragInfo {
    let k = frag_key(pkt);
    let Some(p) = FRAGS.get_ptr_mut(&k) else {
        return FragInfo::Unknown;
    };
    // SAFETY: a valid map value.
    let (host, sport, dport) = unsafe { ((*p).host, (*p).sport, (*p).dport) };
    frag_account(&k, p, pkt);
    if host != 0 {
        return FragInfo::Host;
    }
    pkt.tuple.sport = sport;
    pkt.tuple.dport = dport;
    FragInfo::Ours
}

/// A first fragment records what its later fragments need: its ports (or that the
/// datagram is the host's), and where it was translated to and redirected.
#[inline(never)]
fn remember_frag(pkt: &Packet, host: bool, xlat: Option<&Tuple>, ifindex: u32) {
    if pkt.first_fragment {
        let ports = FragPorts {
            sport: pkt.tuple.sport,
            dport: pkt.tuple.dport,
            host: host as u8,
            _pad: [0; 3],
            saddr: xlat.map_or(0, |t| t.saddr),
            daddr: xlat.map_or(0, |t| t.daddr),
            ifindex,
            seen: pkt.l3_payload,
            total: 0,
        };
        let _ = FRAGS.insert(&frag_key(pkt), &ports, BPF_ANY as u64);
    }
}

/// The recorded translation of a later fragment's datagram (egress, hairpin), into
/// `out`; false if none.
#[inline(never)]
fn frag_xlat(pkt: &Packet, out: &mut FragPorts) -> bool {
    let k = frag_key(pkt);
    let Some(p) = FRAGS.get_ptr_mut(&k) else {
        return false;
    };
    // SAFETY: a valid map value.
    let v = unsafe { *p };
    if v.host != 0 || v.saddr == 0 {
        return false;
    }
    frag_account(&k, p, pkt);
    *out = v;
    true
}

pub fn uplink_egress(ctx: &TcContext) -> Verdict {
    // SAFETY: reading and writing a field of the context the kernel handed us.
    unsafe {
        if (*ctx.skb.skb).mark == fastpath::MARK {
            // Translated at its bridge port already (fast path).
            (*ctx.skb.skb).mark = 0;
            return Verdict::Pass;
        }
    }
    if is_ipv6(ctx) {
        return into_verdict(config().map_or(Ok(()), |cfg| nat6::uplink_egress6(ctx, cfg)));
    }
    into_verdict(egress_translate(ctx).map(|_| ()))
}

/// Masquerade (and port-forward replies) of a packet leaving the host: at the uplink's
/// egress, or at a container's bridge port on the fast path. Returns whether the
/// packet was translated.
/// A function of its own (it runs at two hook points), returning `Result<u32, _>`:
/// with `Result<bool, _>` LLVM leaves payload bits undefined, which the verifier
/// refuses to read.
#[inline(never)]
fn egress_translate(ctx: &TcContext) -> Result<u32, Stat> {
    egress_translate_inner(ctx).map(|t| t as u32)
}

#[inline(always)]
fn egress_translate_inner(ctx: &TcContext) -> Result<bool, Stat> {
    let Some(cfg) = config() else {
        return Ok(false);
    };
    if cfg.uplink_addr == 0 {
        return Ok(false);
    }
    // Parsed into per-CPU scratch, as on the hairpin path.
    let pkt = PKT_SCRATCH.get_ptr_mut(0).ok_or(Stat::DropMalformed)?;
    // SAFETY: a per-CPU slot, ours while the program runs.
    let pkt = unsafe { &mut *pkt };
    match packet::parse_into(ctx, pkt)? {
        Kind::Other => return Ok(false),
        Kind::Ipv4 => {}
        Kind::IcmpError => {
            let p = &*pkt;
            if icmp::translate_error(ctx, p, dir::UPLINK_EGRESS)? {
                stats::inc(Stat::IcmpErrors);
                return Ok(true);
            } else if leaving(cfg, &p.tuple) == Leaving::Masquerade {
                // An error about no flow of this container's: nothing to translate it
                // by, and it must not leave with a private source.
                return Err(Stat::DropIcmpType);
            }
            return Ok(false);
        }
    };
    if pkt.later_fragment && pkt.l4 != L4::AddrOnly {
        // A later fragment has no ports, and needs none: every flow leaving through the
        // uplink takes the uplink address, and the ports were rewritten in the first
        // fragment. So fragments translate in any order, without waiting for the first.
        if !masquerades(cfg, &pkt.tuple) {
            return Ok(false);
        }
        // The first fragment's source, when it passed first: a port forward's reply
        // leaves from the address its mapping is on.
        let mut f = FragPorts::default();
        let saddr = if frag_xlat(pkt, &mut f) {
            f.saddr
        } else {
            cfg.uplink_addr
        };
        let new = Tuple { saddr, ..pkt.tuple };
        stats::inc(Stat::FragAddrOnly);
        return packet::rewrite(ctx, pkt, &new).map(|()| true);
    }
    if !in_subnet(cfg, pkt.tuple.saddr) && host_port(cfg, pkt, pkt.tuple.sport) {
        // The host's own, from a port no container flow holds: nothing to reclaim.
        return Ok(false);
    }
    let len = ctx.len();
    let mut xlat: Tuple = mem::zeroed();
    let hit = match conntrack::lookup(pkt, dir::UPLINK_EGRESS, len, &mut xlat) {
        Lookup::Hit(kind) => {
            stats::inc(if kind == ct_kind::DNAT {
                Stat::DnatReplyPackets
            } else if pkt.l4 == L4::AddrOnly {
                Stat::ProtoAddrOnly
            } else {
                Stat::SnatPackets
            });
            Some(xlat)
        }
        Lookup::BlindRst => return Err(Stat::TcpBlindRst),
        Lookup::Miss => None,
    };
    let new = match hit {
        Some(xlat) => xlat,
        None => {
            if pkt.tuple.saddr == cfg.uplink_addr {
                // The host's own flow: untouched. If a container flow that kept its
                // port would take this flow's replies, the host wins the tuple.
                conntrack::reclaim_for_host(pkt);
                return Ok(false);
            }
            // Only container flows leaving the host are masqueraded; the host's own
            // traffic, anything addressed back into the subnet and routed destinations
            // (`--no-masquerade`, `--allow-inbound`) pass untouched, with no flow (no
            // conntrack entry, nothing charged to the container's budget). Checked
            // after the lookup: a flow translated before the destination became routed
            // keeps its translation until it ends.
            if !masquerades(cfg, &pkt.tuple) {
                return Ok(false);
            }
            match pkt.l4 {
                L4::Ports | L4::IcmpQuery => {
                    let mine = Tuple {
                        saddr: cfg.uplink_addr,
                        ..pkt.tuple
                    };
                    let host_owned = conntrack::host_socket_owns(ctx, pkt.proto, &mine, true);
                    if host_owned {
                        stats::inc(Stat::PortHostSocket);
                    }
                    conntrack::create_snat(pkt, cfg, len, host_owned, &mut xlat)?;
                    stats::inc(Stat::SnatPackets);
                    xlat
                }
                L4::AddrOnly => {
                    conntrack::create_addr_only(pkt, cfg.uplink_addr, len, &mut xlat)?;
                    stats::inc(Stat::ProtoAddrOnly);
                    xlat
                }
                // Redirects, router adverts...: nothing to translate, and never sent
                // with a private source.
                L4::IcmpOther => return Err(Stat::DropIcmpType),
            }
        }
    };
    remember_frag(pkt, false, Some(&new), 0);
    packet::rewrite(ctx, pkt, &new).map(|()| true)
}

pub fn uplink_ingress(ctx: &TcContext) -> Verdict {
    if is_ipv6(ctx) {
        return match config().map_or(Ok(0), |cfg| nat6::uplink_ingress6(ctx, cfg)) {
            Ok(0) => Verdict::Pass,
            Ok(ifindex) => Verdict::RedirectPeer(ifindex),
            Err(s) => Verdict::Drop(s),
        };
    }
    let mut drop = Stat::PortPassed;
    let raw = uplink_ingress4(ctx, &mut drop);
    verdict_of(raw, drop)
}

/// The IPv4 path in a frame of its own: the IPv6 path's frames beside it in one
/// function would pass the 512-byte stack limit.
#[inline(never)]
fn uplink_ingress4(ctx: &TcContext, drop: &mut Stat) -> u64 {
    outcome(try_uplink_ingress(ctx), drop)
}

/// Returned for a drop by a path across a call (its reason in `drop`).
const DROPPED: u64 = u64::MAX;

/// A path's outcome as plain scalars across a call (as for [`hairpin_call`]: LLVM
/// leaves payload bits of an enum undefined, which the verifier refuses to read).
#[inline(always)]
fn outcome(r: Result<Fast, Stat>, drop: &mut Stat) -> u64 {
    match r {
        Ok(f) => f.raw(),
        Err(s) => {
            *drop = s;
            DROPPED
        }
    }
}

#[inline(always)]
fn verdict_of(raw: u64, drop: Stat) -> Verdict {
    if raw == DROPPED {
        Verdict::Drop(drop)
    } else {
        Fast::from_raw(raw).verdict()
    }
}

/// Nothing from outside may claim a source inside the bridge subnet, or reach a
/// container address directly unless its source is an `--allow-inbound` one (the
/// container flows' replies and port forwards are addressed to host addresses).
#[inline(always)]
fn inbound_guard(cfg: &Config, t: &Tuple) -> Result<(), Stat> {
    if in_subnet(cfg, t.saddr) {
        return Err(Stat::DropInboundSpoofed);
    }
    if in_subnet(cfg, t.daddr) && t.daddr != cfg.gateway && !inbound_allowed(cfg, t.saddr) {
        return Err(Stat::DropInbound);
    }
    Ok(())
}

#[inline(always)]
fn try_uplink_ingress(ctx: &TcContext) -> Result<Fast, Stat> {
    let Some(cfg) = config() else {
        return Ok(Fast::STACK);
    };
    if cfg.uplink_addr == 0 {
        return Ok(Fast::STACK);
    }
    let mut pkt = Packet::EMPTY;
    match packet::parse_into(ctx, &mut pkt)? {
        Kind::Other => return Ok(Fast::STACK),
        Kind::Ipv4 => {}
        Kind::IcmpError => {
            let p = &pkt;
            inbound_guard(cfg, &p.tuple)?;
            if p.tuple.daddr == cfg.uplink_addr
                && icmp::translate_error(ctx, p, dir::UPLINK_INGRESS)?
            {
                stats::inc(Stat::IcmpErrors);
            }
            return Ok(Fast::STACK);
        }
    };
    inbound_guard(cfg, &pkt.tuple)?;
    // 127/8 from the wire is a martian the kernel drops; a loopback-only mapping must
    // never be reached this way (TC ingress runs before that check: CVE-2020-8558).
    if is_loopback(pkt.tuple.daddr) {
        return Ok(Fast::STACK);
    }
    if host_port(cfg, &pkt, pkt.tuple.dport) {
        return Ok(Fast::STACK);
    }
    // Replies and port forwards may be addressed to any address of the uplink (a
    // mapping can name a secondary one); the conntrack key includes the address.
    let to_uplink = pkt.tuple.daddr == cfg.uplink_addr;
    if pkt.later_fragment && pkt.l4 != L4::AddrOnly {
        match frag_ports(&mut pkt) {
            FragInfo::Ours => {}
            FragInfo::Host => {
                stats::inc(Stat::FragHost);
                return Ok(Fast::STACK);
            }
            FragInfo::Unknown => {
                // It overtook its first fragment, whose ports say whether it is a
                // container's: keep a copy for then, and let the original go on to the
                // host, whose datagram it may well be.
                if to_uplink {
                    match frag::stash(ctx, &frag_key(&pkt)) {
                        Ok(()) => stats::inc(Stat::FragStashed),
                        Err(s) => stats::inc(s),
                    }
                }
                return Ok(Fast::STACK);
            }
        }
    }
    let len = ctx.len();
    let mut xlat: Tuple = mem::zeroed();
    let new = match conntrack::lookup(&pkt, dir::UPLINK_INGRESS, len, &mut xlat) {
        Lookup::Hit(kind) => {
            stats::inc(if kind == ct_kind::DNAT {
                Stat::DnatPackets
            } else {
                Stat::SnatReplyPackets
            });
            xlat
        }
        Lookup::BlindRst => return Err(Stat::TcpBlindRst),
        Lookup::Miss => match forward_target(ctx, &pkt, to_uplink) {
            Some(t) => {
                conntrack::create_dnat(&pkt, t.addr, t.port, len, &mut xlat)?;
                stats::inc(Stat::DnatPackets);
                xlat
            }
            None => {
                // The host's own: its later fragments pass without a copy, and copies
                // of ones that overtook this first fragment are dropped.
                if pkt.first_fragment {
                    remember_frag(&pkt, true, None, 0);
                    frag::discard(&frag_key(&pkt));
                }
                return Ok(Fast::STACK);
            }
        },
    };
    remember_frag(&pkt, false, None, 0);
    packet::rewrite(ctx, &pkt, &new)?;
    if pkt.first_fragment {
        frag::replay(ctx, &frag_key(&pkt), cfg.uplink_ifindex)?;
    }
    Ok(fastpath::to_container(ctx, cfg, new.daddr))
}

/// The port forward a new flow arriving on the uplink opens, if any: a mapping on the
/// address it is sent to that belongs to this interface, or a wildcard one on the
/// uplink's main address. A connected host socket that already owns the flow keeps
/// it; a listener on the port does not.
#[inline(always)]
fn forward_target(ctx: &TcContext, pkt: &Packet, to_uplink: bool) -> Option<PortTarget> {
    if pkt.l4 != L4::Ports || pkt.later_fragment {
        return None;
    }
    let t = portfwd::lookup(pkt.tuple.daddr, pkt.tuple.dport, pkt.proto)?;
    if !portfwd::reachable_on(&t, skb_ifindex(ctx), to_uplink) {
        return None;
    }
    let p = &pkt.tuple;
    if conntrack::host_socket_owns(ctx, pkt.proto, &p.reversed(), false) {
        stats::inc(Stat::HostSocketPassed);
        return None;
    }
    Some(t)
}

pub fn port_ingress(ctx: &TcContext) -> Verdict {
    let mut drop = Stat::PortPassed;
    // Each family in a frame of its own, as at the uplink.
    let raw = if is_ipv6(ctx) {
        port_ingress6(ctx, &mut drop)
    } else {
        port_ingress4(ctx, &mut drop)
    };
    verdict_of(raw, drop)
}

#[inline(never)]
fn port_ingress4(ctx: &TcContext, drop: &mut Stat) -> u64 {
    outcome(try_port_ingress(ctx), drop)
}

#[inline(never)]
fn port_ingress6(ctx: &TcContext, drop: &mut Stat) -> u64 {
    outcome(try_port_ingress6(ctx), drop)
}

/// The frame's Ethernet header and the bridge port it arrived on, which must be a
/// container's and carry that container's own MAC as the source.
#[inline(always)]
fn own_port(ctx: &TcContext) -> Result<(EthHdr, &'static BridgePort), Stat> {
    let eth = packet::eth(ctx)?;
    // SAFETY: a valid map value, read at once.
    let Some(port) = (unsafe { BRIDGE_PORTS.get(&skb_ifindex(ctx)) }) else {
        return Err(Stat::DropNoEndpoint);
    };
    if eth.src != port.mac {
        return Err(Stat::DropSpoofedMac);
    }
    Ok((eth, port))
}

/// IPv6 from a container: its own MAC and port, then [`nat6::port_check6`].
#[inline(always)]
fn try_port_ingress6(ctx: &TcContext) -> Result<Fast, Stat> {
    let (eth, port) = own_port(ctx)?;
    let cfg = config().ok_or(Stat::DropIpv6Off)?;
    Ok(match nat6::port_check6(ctx, cfg, port)? {
        0 => Fast::STACK,
        // Routed through the gateway to the outside.
        nat6::OUTSIDE if eth.dst == cfg.bridge_mac => nat6::fast_out6(ctx, cfg)?,
        nat6::OUTSIDE => Fast::STACK,
        ifindex => Fast::out(ifindex),
    })
}

/// A container may only send from its own MAC, through its own port, and only IPv4
/// from its own address and ARP about itself: anything else could poison the bridge's
/// FDB or the host's and other containers' neighbour caches. Nor may it configure the
/// host (ICMP redirects, router adverts). Then hairpin: a container reaching a port
/// forward through a host address is sent straight to the target container. Returns
/// the ifindex to redirect to, if any.
#[inline(always)]
fn try_port_ingress(ctx: &TcContext) -> Result<Fast, Stat> {
    let (eth, port) = own_port(ctx)?;
    match u16::from_be(eth.proto) {
        ETH_P_IP => {}
        ETH_P_ARP => {
            let sender_mac: [u8; 6] = ctx
                .load(packet::ARP_SENDER_MAC_OFF)
                .map_err(|_| Stat::DropMalformed)?;
            let sender_ip: u32 = ctx
                .load(packet::ARP_SENDER_IP_OFF)
                .map_err(|_| Stat::DropMalformed)?;
            if sender_mac != port.mac {
                return Err(Stat::DropSpoofedMac);
            }
            // 0.0.0.0: an ARP probe (duplicate address detection) claims nothing.
            if sender_ip != port.addr && sender_ip != 0 {
                return Err(Stat::DropSpoofedIp);
            }
            return Ok(Fast::STACK);
        }
        _ => return Err(Stat::DropEthertype),
    }
    let ip: Ipv4Hdr = Frame::new(ctx).get(ETH_HLEN).ok_or(Stat::DropMalformed)?;
    if ip.saddr != port.addr {
        return Err(Stat::DropSpoofedIp);
    }
    if ip.proto == IPPROTO_ICMP && u16::from_be(ip.frag_off) & 0x1fff == 0 {
        let ihl = ((ip.vihl & 0x0f) as usize) * 4;
        let ty: u8 = ctx.load(ETH_HLEN + ihl).map_err(|_| Stat::DropMalformed)?;
        if ty == ICMP_REDIRECT || ty == ICMP_ROUTER_ADVERT {
            return Err(Stat::DropIcmpType);
        }
    }
    stats::inc(Stat::PortPassed);
    let Some(cfg) = config() else {
        return Ok(Fast::STACK);
    };
    // Every hairpinned packet is addressed to a host address (the uplink's, or the
    // gateway the target replies to).
    if ip.daddr == cfg.uplink_addr || ip.daddr == cfg.gateway {
        let mut ifindex = 0;
        let mut drop = Stat::PortPassed;
        return match hairpin_call(ctx, cfg, &mut ifindex, &mut drop) {
            0 => Ok(Fast::STACK),
            1 => Ok(Fast::out(ifindex)),
            _ => Err(drop),
        };
    }
    if eth.dst != cfg.bridge_mac {
        return Ok(fastpath::to_neighbour(cfg, &eth.dst, ip.daddr));
    }
    if in_subnet(cfg, ip.daddr) || cfg.uplink_addr == 0 {
        return Ok(Fast::STACK);
    }
    // A routed destination (`--no-masquerade`, `--allow-inbound`) is the stack's: not
    // translated here, the host routes it (and the uplink's egress counts it). A port
    // forward's reply to such a peer is translated there too.
    if routed_dest(cfg, ip.daddr) {
        return Ok(Fast::STACK);
    }
    // Routed through the gateway to the outside: translate here and send it out.
    let mut macs: fastpath::Macs = mem::zeroed();
    let fast = fastpath::route_out(ctx, cfg, &ip, &mut macs);
    if fast.is_stack() {
        return Ok(Fast::STACK);
    }
    if egress_translate(ctx)? == 0 {
        return Ok(Fast::STACK);
    }
    Ok(fastpath::finish_out(ctx, fast, &macs, false))
}

/// Hairpin NAT: destination -> the target container (port forward), source -> the
/// gateway with an allocated port, so the target's reply comes back to the gateway,
/// through the target's own bridge port, where the reverse entry undoes both. Frames
/// are redirected port to port, so the host stack (and its martian-source check on a
/// gateway-sourced packet) is never involved, and a container can reach itself.
/// [`hairpin`] as a function of its own (the caller's stack is needed for the fast
/// path), returning plain scalars: 0 pass, 1 redirect to `out`, 2 drop for `drop`.
#[inline(never)]
fn hairpin_call(ctx: &TcContext, cfg: &Config, out: &mut u32, drop: &mut Stat) -> u32 {
    // Result<u32, _>: no undefined payload bits for LLVM to fill with a pointer.
    match hairpin(ctx, cfg, out) {
        Ok(v) => v,
        Err(s) => {
            *drop = s;
            2
        }
    }
}

/// `out`: the bridge port to redirect to, when 1.
#[inline(always)]
fn hairpin(ctx: &TcContext, cfg: &Config, out: &mut u32) -> Result<u32, Stat> {
    // Parsed into per-CPU scratch: this path's stack also holds pair creation and
    // the budget recount (TC programs do not nest on a CPU).
    let pkt = PKT_SCRATCH.get_ptr_mut(0).ok_or(Stat::DropMalformed)?;
    // SAFETY: a per-CPU slot, ours while the program runs.
    let pkt = unsafe { &mut *pkt };
    if packet::parse_into(ctx, pkt)? != Kind::Ipv4 || pkt.l4 != L4::Ports {
        return Ok(0);
    }
    if pkt.later_fragment {
        // No ports: the first fragment recorded where its datagram went.
        let mut f = FragPorts::default();
        if !frag_xlat(pkt, &mut f) {
            return Ok(0);
        }
        let Some(ep) = (unsafe { ENDPOINTS.get(&f.daddr) }) else {
            return Err(Stat::DropNoEndpoint);
        };
        let ep = *ep;
        let new = Tuple {
            saddr: f.saddr,
            daddr: f.daddr,
            ..pkt.tuple
        };
        packet::rewrite(ctx, pkt, &new)?;
        packet::set_macs(ctx, &ep.mac, &cfg.bridge_mac)?;
        stats::inc(Stat::HairpinPackets);
        *out = f.ifindex;
        return Ok(1);
    }
    let len = ctx.len();
    let mut xlat: Tuple = mem::zeroed();
    let new = match conntrack::lookup(pkt, dir::BRIDGE, len, &mut xlat) {
        Lookup::Hit(_) => xlat,
        Lookup::BlindRst => return Err(Stat::TcpBlindRst),
        Lookup::Miss => {
            let Some(t) = portfwd::lookup(pkt.tuple.daddr, pkt.tuple.dport, pkt.proto) else {
                return Ok(0);
            };
            // Wildcard mappings, and ones on the uplink's or the bridge's addresses;
            // never loopback-only ones.
            if t.ifindex != 0 && t.ifindex != cfg.uplink_ifindex && t.ifindex != cfg.bridge_ifindex
            {
                return Ok(0);
            }
            conntrack::create_hairpin(pkt, cfg, &t, len, &mut xlat)?;
            xlat
        }
    };
    let ep = match unsafe { ENDPOINTS.get(&new.daddr) } {
        Some(ep) => *ep,
        None => return Err(Stat::DropNoEndpoint),
    };
    remember_frag(pkt, false, Some(&new), ep.ifindex);
    packet::rewrite(ctx, pkt, &new)?;
    packet::set_macs(ctx, &ep.mac, &cfg.bridge_mac)?;
    stats::inc(Stat::HairpinPackets);
    *out = ep.ifindex;
    Ok(1)
}
