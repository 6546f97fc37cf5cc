//! The three programs' logic: masquerade and port-forward translation on the uplink,
//! source validation on bridge ports.

use aya_ebpf::{bindings::BPF_ANY, programs::TcContext};
use netns_common::{
    Config, FragKey, FragPorts, IPPROTO_TCP, IPPROTO_UDP, PortKey, Stat, Tuple, ct_kind, dir,
};

use crate::{
    conntrack, frag, icmp,
    maps::{ENDPOINTS, FRAGS, PORTS, config},
    packet::{self, Packet, Parsed},
    stats::{self, Verdict},
};

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

/// Later fragments carry no ports: take them from the first fragment of the datagram.
#[inline(always)]
fn frag_ports(pkt: &mut Packet) -> bool {
    match unsafe { FRAGS.get(&frag_key(pkt)) } {
        Some(p) => {
            pkt.tuple.sport = p.sport;
            pkt.tuple.dport = p.dport;
            true
        }
        None => false,
    }
}

#[inline(always)]
fn remember_frag(pkt: &Packet) {
    if pkt.first_fragment {
        let ports = FragPorts {
            sport: pkt.tuple.sport,
            dport: pkt.tuple.dport,
        };
        let _ = FRAGS.insert(&frag_key(pkt), &ports, BPF_ANY as u64);
    }
}

pub fn uplink_egress(ctx: &TcContext) -> Verdict {
    into_verdict(try_uplink_egress(ctx))
}

fn try_uplink_egress(ctx: &TcContext) -> Result<(), Stat> {
    let Some(cfg) = config() else { return Ok(()) };
    if cfg.uplink_addr == 0 {
        return Ok(());
    }
    let pkt = match packet::parse(ctx)? {
        Parsed::Other => return Ok(()),
        Parsed::Ipv4(p) => p,
        Parsed::IcmpError(p) => {
            if icmp::translate_error(ctx, &p, dir::UPLINK_EGRESS)? {
                stats::inc(Stat::IcmpErrors);
            }
            return Ok(());
        }
    };
    if pkt.later_fragment {
        // A later fragment has no ports, and needs none: every flow leaving through the
        // uplink takes the uplink address, and the ports were rewritten in the first
        // fragment. So fragments translate in any order, without waiting for the first.
        if !in_subnet(cfg, pkt.tuple.saddr) || in_subnet(cfg, pkt.tuple.daddr) {
            return Ok(());
        }
        let new = Tuple {
            saddr: cfg.uplink_addr,
            ..pkt.tuple
        };
        stats::inc(Stat::FragAddrOnly);
        return packet::rewrite(ctx, &pkt, &new);
    }
    let len = ctx.len();
    let key = conntrack::key(&pkt, dir::UPLINK_EGRESS);
    let hit = match conntrack::lookup(&key, &pkt, len) {
        Some((xlat, kind, _)) if kind == ct_kind::DNAT => {
            stats::inc(Stat::DnatReplyPackets);
            Some(xlat)
        }
        // The reverse half is checked every 16th packet: an evicted or reclaimed half
        // is found within 16 packets without a second lookup on every packet.
        Some((xlat, _, n)) if n & 15 != 0 || conntrack::check_reverse(&pkt, &xlat) => {
            stats::inc(Stat::SnatPackets);
            Some(xlat)
        }
        _ => None,
    };
    let new = match hit {
        Some(xlat) => xlat,
        None => {
            // Only container flows leaving the host are masqueraded; the host's own
            // traffic and anything addressed back into the subnet pass untouched.
            if !in_subnet(cfg, pkt.tuple.saddr)
                || pkt.tuple.saddr == cfg.gateway
                || in_subnet(cfg, pkt.tuple.daddr)
            {
                return Ok(());
            }
            let xlat = conntrack::create_snat(
                ctx,
                &pkt,
                cfg.uplink_addr,
                cfg.nat_port_min,
                cfg.nat_port_max,
                len,
            )?;
            stats::inc(Stat::SnatPackets);
            xlat
        }
    };
    packet::rewrite(ctx, &pkt, &new)
}

pub fn uplink_ingress(ctx: &TcContext) -> Verdict {
    into_verdict(try_uplink_ingress(ctx))
}

fn try_uplink_ingress(ctx: &TcContext) -> Result<(), Stat> {
    let Some(cfg) = config() else { return Ok(()) };
    if cfg.uplink_addr == 0 {
        return Ok(());
    }
    let mut pkt = match packet::parse(ctx)? {
        Parsed::Other => return Ok(()),
        Parsed::Ipv4(p) => p,
        Parsed::IcmpError(p) => {
            if p.tuple.daddr == cfg.uplink_addr
                && icmp::translate_error(ctx, &p, dir::UPLINK_INGRESS)?
            {
                stats::inc(Stat::IcmpErrors);
            }
            return Ok(());
        }
    };
    // Replies and port forwards may be addressed to any address of the uplink (a
    // mapping can name a secondary one); the conntrack key includes the address.
    let to_uplink = pkt.tuple.daddr == cfg.uplink_addr;
    if pkt.later_fragment && !frag_ports(&mut pkt) {
        if !to_uplink {
            return Ok(());
        }
        // It overtook its first fragment, whose ports say which container it is for:
        // hold it until the first fragment arrives. Dropped here, sent on from there.
        frag::stash(ctx, &frag_key(&pkt))?;
        return Err(Stat::FragStashed);
    }
    let len = ctx.len();
    let key = conntrack::key(&pkt, dir::UPLINK_INGRESS);
    let new = match conntrack::lookup(&key, &pkt, len) {
        Some((xlat, kind, _)) => {
            stats::inc(if kind == ct_kind::DNAT {
                Stat::DnatPackets
            } else {
                Stat::SnatReplyPackets
            });
            xlat
        }
        None => {
            if pkt.later_fragment || (pkt.proto != IPPROTO_TCP && pkt.proto != IPPROTO_UDP) {
                return Ok(());
            }
            let mut pk = PortKey {
                host_addr: pkt.tuple.daddr,
                host_port: pkt.tuple.dport,
                proto: pkt.proto,
                _pad: 0,
            };
            let target = match unsafe { PORTS.get(&pk) } {
                Some(t) => *t,
                // Wildcard mappings: the uplink's main address.
                None if to_uplink => {
                    pk.host_addr = 0;
                    match unsafe { PORTS.get(&pk) } {
                        Some(t) => *t,
                        None => return Ok(()),
                    }
                }
                None => return Ok(()),
            };
            let xlat = conntrack::create_dnat(&pkt, target.addr, target.port, len)?;
            stats::inc(Stat::DnatPackets);
            xlat
        }
    };
    remember_frag(&pkt);
    packet::rewrite(ctx, &pkt, &new)?;
    if pkt.first_fragment {
        frag::replay(ctx, &frag_key(&pkt), cfg.uplink_ifindex)?;
    }
    Ok(())
}

pub fn port_ingress(ctx: &TcContext) -> Verdict {
    match try_port_ingress(ctx) {
        Ok(Some(ifindex)) => Verdict::Redirect(ifindex),
        Ok(None) => Verdict::Pass,
        Err(s) => Verdict::Drop(s),
    }
}

const IP_SADDR_OFF: usize = packet::ETH_HLEN + 12;

/// A container may only send IPv4 from its own address and MAC, through its own port.
/// Then hairpin: a container reaching a port forward through a host address is sent
/// straight to the target container. Returns the ifindex to redirect to, if any.
fn try_port_ingress(ctx: &TcContext) -> Result<Option<u32>, Stat> {
    let eth = packet::eth(ctx)?;
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    match u16::from_be(eth.proto) {
        0x0800 => {}
        // ARP: the sender must be the container itself, or it could poison the host's
        // and its neighbours' caches (claim the gateway or another container).
        0x0806 => {
            let sender_mac: [u8; 6] = ctx
                .load(packet::ETH_HLEN + 8)
                .map_err(|_| Stat::DropMalformed)?;
            let sender_ip: u32 = ctx
                .load(packet::ETH_HLEN + 14)
                .map_err(|_| Stat::DropMalformed)?;
            if sender_ip == 0 {
                // ARP probe (duplicate address detection) carries no claim.
                return if sender_mac == eth.src {
                    Ok(None)
                } else {
                    Err(Stat::DropSpoofedMac)
                };
            }
            let ep = match unsafe { ENDPOINTS.get(&sender_ip) } {
                Some(ep) if ep.ifindex == ifindex => ep,
                _ => return Err(Stat::DropSpoofedIp),
            };
            if ep.mac != eth.src || ep.mac != sender_mac {
                return Err(Stat::DropSpoofedMac);
            }
            return Ok(None);
        }
        _ => return Ok(None),
    }
    let saddr: u32 = ctx.load(IP_SADDR_OFF).map_err(|_| Stat::DropMalformed)?;
    let ep = match unsafe { ENDPOINTS.get(&saddr) } {
        Some(ep) => ep,
        None => return Err(Stat::DropSpoofedIp),
    };
    if ep.ifindex != ifindex {
        return Err(Stat::DropSpoofedIp);
    }
    if ep.mac != eth.src {
        return Err(Stat::DropSpoofedMac);
    }
    stats::inc(Stat::PortPassed);
    hairpin(ctx)
}

/// Hairpin NAT: destination -> the target container (port forward), source -> the
/// gateway with an allocated port, so the target's reply comes back to the gateway,
/// through the target's own bridge port, where the reverse entry undoes both. Frames
/// are redirected port to port, so the host stack (and its martian-source check on a
/// gateway-sourced packet) is never involved, and a container can reach itself.
#[inline(always)]
fn hairpin(ctx: &TcContext) -> Result<Option<u32>, Stat> {
    let Some(cfg) = config() else { return Ok(None) };
    // Every hairpinned packet is addressed to a host address (the uplink's, or the
    // gateway the target replies to): anything else needs no parse and no lookup.
    let daddr: u32 = ctx
        .load(packet::IP_DADDR_OFF)
        .map_err(|_| Stat::DropMalformed)?;
    if daddr != cfg.uplink_addr && daddr != cfg.gateway {
        return Ok(None);
    }
    let pkt = match packet::parse(ctx)? {
        Parsed::Ipv4(p) if !p.later_fragment => p,
        _ => return Ok(None),
    };
    let len = ctx.len();
    let key = conntrack::key(&pkt, dir::BRIDGE);
    let new = match conntrack::lookup(&key, &pkt, len) {
        Some((xlat, _, _)) => xlat,
        None => {
            let d = pkt.tuple.daddr;
            if (d != cfg.uplink_addr && d != cfg.gateway) || d == 0 {
                return Ok(None);
            }
            if pkt.proto != IPPROTO_TCP && pkt.proto != IPPROTO_UDP {
                return Ok(None);
            }
            let mut pk = PortKey {
                host_addr: d,
                host_port: pkt.tuple.dport,
                proto: pkt.proto,
                _pad: 0,
            };
            let target = match unsafe { PORTS.get(&pk) } {
                Some(t) => *t,
                None => {
                    pk.host_addr = 0;
                    match unsafe { PORTS.get(&pk) } {
                        Some(t) => *t,
                        None => return Ok(None),
                    }
                }
            };
            conntrack::create_hairpin(&pkt, cfg, target.addr, target.port, len)?
        }
    };
    let ep = match unsafe { ENDPOINTS.get(&new.daddr) } {
        Some(ep) => *ep,
        None => return Err(Stat::DropNoEndpoint),
    };
    packet::rewrite(ctx, &pkt, &new)?;
    packet::set_macs(ctx, &ep.mac, &cfg.bridge_mac)?;
    stats::inc(Stat::HairpinPackets);
    Ok(Some(ep.ifindex))
}
