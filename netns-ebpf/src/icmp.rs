//! ICMP errors about translated flows. A router's "fragmentation needed", "TTL
//! exceeded" or a peer's "port unreachable" quotes the IP header and first L4 bytes of
//! the packet that caused it, as that packet looked after translation. The outer
//! destination (or source) and the quoted header are both translated back, and every
//! checksum involved is fixed incrementally: outer IP, ICMP, quoted IP, quoted L4.

use aya_ebpf::programs::TcContext;
use netns_common::{CtKey, IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP, Stat, Tuple, dir};

use crate::{
    conntrack,
    packet::{
        ICMP_CSUM, ICMP_ID, ICMP_QUOTE, IP_CSUM_OFF, IP_DADDR_OFF, IP_SADDR_OFF, IPH_CSUM,
        IPH_DADDR, IPH_SADDR, Ipv4Hdr, L4_DPORT, L4_SPORT, Packet, icmp_query, l4_csum_off,
    },
};

/// Writes `to` over the `SIZE`-byte field at `off` inside the ICMP payload and fixes the
/// ICMP checksum for it.
#[inline(always)]
fn patch<T: Copy + Into<u64>>(
    ctx: &TcContext,
    icmp_csum: usize,
    off: usize,
    from: T,
    to: T,
) -> Result<(), Stat> {
    let size = core::mem::size_of::<T>() as u64;
    ctx.store(off, &to, 0).map_err(|_| Stat::DropCsumHelper)?;
    ctx.l4_csum_replace(icmp_csum, from.into(), to.into(), size)
        .map_err(|_| Stat::DropCsumHelper)
}

/// Adjusts the checksum field at `csum_off` inside the ICMP payload for a change of
/// `from` to `to` (`size` bytes) in what it covers, then fixes the ICMP checksum for the
/// checksum field's own change. `zero_means_none`: a UDP checksum of 0 stays 0.
#[inline(always)]
fn patch_inner_csum(
    ctx: &TcContext,
    icmp_csum: usize,
    csum_off: usize,
    from: u64,
    to: u64,
    size: u64,
    zero_means_none: bool,
) -> Result<(), Stat> {
    let Ok(old) = ctx.load::<u16>(csum_off) else {
        // Not quoted (the error carried only the first 8 L4 bytes): nothing to fix.
        return Ok(());
    };
    if zero_means_none && old == 0 {
        return Ok(());
    }
    ctx.l4_csum_replace(csum_off, from, to, size)
        .map_err(|_| Stat::DropCsumHelper)?;
    let new: u16 = ctx.load(csum_off).map_err(|_| Stat::DropCsumHelper)?;
    ctx.l4_csum_replace(icmp_csum, old as u64, new as u64, 2)
        .map_err(|_| Stat::DropCsumHelper)
}

/// Translates an ICMP error seen at hook point `at` (uplink ingress or egress). Returns
/// false if it is not about a tracked flow (it then passes untouched).
#[inline(never)]
pub fn translate_error(ctx: &TcContext, outer: &Packet, at: u8) -> Result<bool, Stat> {
    let icmp_csum = outer.l4_off + ICMP_CSUM;
    let ip_off = outer.l4_off + ICMP_QUOTE;
    let Ok(ip) = ctx.load::<Ipv4Hdr>(ip_off) else {
        return Ok(false);
    };
    let ihl = ((ip.vihl & 0x0f) as usize) * 4;
    if ihl < 20 {
        return Ok(false);
    }
    let l4_off = ip_off + ihl;
    let mut quoted = Tuple {
        saddr: ip.saddr,
        daddr: ip.daddr,
        sport: 0,
        dport: 0,
    };
    let mut icmp_id_off = 0;
    let mut echo_request = false;
    match ip.proto {
        IPPROTO_TCP | IPPROTO_UDP => {
            let Ok(ports) = ctx.load::<[u16; 2]>(l4_off) else {
                return Ok(false);
            };
            quoted.sport = ports[0];
            quoted.dport = ports[1];
        }
        IPPROTO_ICMP => {
            let Ok(ty) = ctx.load::<u8>(l4_off) else {
                return Ok(false);
            };
            let Ok(id) = ctx.load::<u16>(l4_off + ICMP_ID) else {
                return Ok(false);
            };
            icmp_id_off = l4_off + ICMP_ID;
            match icmp_query(ty) {
                Some(true) => {
                    quoted.sport = id;
                    echo_request = true;
                }
                Some(false) => quoted.dport = id,
                None => return Ok(false),
            }
        }
        // Address-only flows (GRE, ESP...): the quoted addresses are all there is.
        _ => {}
    }
    // The quoted packet travelled the other way: a packet of the same flow arriving
    // here would carry the quoted tuple reversed.
    let key = CtKey::new(quoted.reversed(), ip.proto, at);
    let Some(e) = conntrack::peek(&key) else {
        return Ok(false);
    };
    let new_quoted = e.xlat.reversed();

    // Outer header: only the end facing the flow's owner changes. ICMP has no pseudo
    // header, so the ICMP checksum does not cover it.
    if at == dir::UPLINK_INGRESS {
        let (o, n) = (outer.tuple.daddr, e.xlat.daddr);
        if o != n {
            ctx.l3_csum_replace(IP_CSUM_OFF, o as u64, n as u64, 4)
                .map_err(|_| Stat::DropCsumHelper)?;
            ctx.store(IP_DADDR_OFF, &n, 0)
                .map_err(|_| Stat::DropCsumHelper)?;
        }
    } else {
        let (o, n) = (outer.tuple.saddr, e.xlat.saddr);
        if o != n {
            ctx.l3_csum_replace(IP_CSUM_OFF, o as u64, n as u64, 4)
                .map_err(|_| Stat::DropCsumHelper)?;
            ctx.store(IP_SADDR_OFF, &n, 0)
                .map_err(|_| Stat::DropCsumHelper)?;
        }
    }

    let l4_csum = l4_csum_off(ip.proto);
    let has_pseudo = ip.proto == IPPROTO_TCP || ip.proto == IPPROTO_UDP;
    let udp = ip.proto == IPPROTO_UDP;
    for (off, o, n) in [
        (ip_off + IPH_SADDR, quoted.saddr, new_quoted.saddr),
        (ip_off + IPH_DADDR, quoted.daddr, new_quoted.daddr),
    ] {
        if o == n {
            continue;
        }
        if has_pseudo {
            patch_inner_csum(ctx, icmp_csum, l4_off + l4_csum, o as u64, n as u64, 4, udp)?;
        }
        patch_inner_csum(
            ctx,
            icmp_csum,
            ip_off + IPH_CSUM,
            o as u64,
            n as u64,
            4,
            false,
        )?;
        patch(ctx, icmp_csum, off, o, n)?;
    }
    if ip.proto == IPPROTO_ICMP {
        let (o, n) = if echo_request {
            (quoted.sport, new_quoted.sport)
        } else {
            (quoted.dport, new_quoted.dport)
        };
        if o != n {
            patch_inner_csum(
                ctx,
                icmp_csum,
                l4_off + ICMP_CSUM,
                o as u64,
                n as u64,
                2,
                false,
            )?;
            patch(ctx, icmp_csum, icmp_id_off, o, n)?;
        }
    } else if has_pseudo {
        for (off, o, n) in [
            (l4_off + L4_SPORT, quoted.sport, new_quoted.sport),
            (l4_off + L4_DPORT, quoted.dport, new_quoted.dport),
        ] {
            if o != n {
                patch_inner_csum(ctx, icmp_csum, l4_off + l4_csum, o as u64, n as u64, 2, udp)?;
                patch(ctx, icmp_csum, off, o, n)?;
            }
        }
    }
    Ok(true)
}
