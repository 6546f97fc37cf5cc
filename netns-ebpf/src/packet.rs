//! Header parsing and rewriting through `bpf_skb_load_bytes` / `bpf_skb_store_bytes` and
//! the checksum helpers. No direct packet access: nothing to pull, no pointer to
//! re-derive after a helper changed the packet, and IPv4 options are handled by reading
//! the real header length.

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR},
    programs::TcContext,
};
use netns_common::{IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP, Stat, Tuple};

pub const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
pub const IP_CSUM_OFF: usize = ETH_HLEN + 10;
pub const IP_SADDR_OFF: usize = ETH_HLEN + 12;
pub const IP_DADDR_OFF: usize = ETH_HLEN + 16;

pub const ICMP_ECHO_REPLY: u8 = 0;
pub const ICMP_ECHO_REQUEST: u8 = 8;
pub const ICMP_DEST_UNREACH: u8 = 3;
pub const ICMP_TIME_EXCEEDED: u8 = 11;
pub const ICMP_PARAMETERPROB: u8 = 12;

#[repr(C)]
#[derive(Clone, Copy)]
pub struct EthHdr {
    pub dst: [u8; 6],
    pub src: [u8; 6],
    pub proto: u16,
}

#[repr(C)]
#[derive(Clone, Copy)]
pub struct Ipv4Hdr {
    pub vihl: u8,
    pub tos: u8,
    pub tot_len: u16,
    pub id: u16,
    pub frag_off: u16,
    pub ttl: u8,
    pub proto: u8,
    pub check: u16,
    pub saddr: u32,
    pub daddr: u32,
}

/// What the datapath needs of an IPv4 packet.
#[derive(Clone, Copy)]
pub struct Packet {
    pub tuple: Tuple,
    pub proto: u8,
    /// Offset of the L4 header (Ethernet + real IPv4 header length).
    pub l4_off: usize,
    /// IP identification (network order), for fragment tracking.
    pub ip_id: u16,
    /// Fragment offset != 0: no L4 header in this packet.
    pub later_fragment: bool,
    /// More-fragments set on a packet with offset 0.
    pub first_fragment: bool,
    /// TCP flags, ICMP type.
    pub l4_flags: u8,
}

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

pub enum Parsed {
    /// Not IPv4, or an L4 protocol the datapath leaves alone.
    Other,
    Ipv4(Packet),
    /// An ICMP error (unreachable, time exceeded, parameter problem): it quotes the
    /// header of a packet of some flow, which must be translated with the outer one.
    IcmpError(Packet),
}

#[inline(always)]
pub fn eth(ctx: &TcContext) -> Result<EthHdr, Stat> {
    ctx.load::<EthHdr>(0).map_err(|_| Stat::DropMalformed)
}

/// Parses Ethernet + IPv4 + the ports (or ICMP identifier) of TCP, UDP and ICMP.
#[inline(always)]
pub fn parse(ctx: &TcContext) -> Result<Parsed, Stat> {
    let proto: u16 = match ctx.load::<u16>(12) {
        Ok(p) => u16::from_be(p),
        Err(_) => return Ok(Parsed::Other),
    };
    if proto != ETH_P_IP {
        return Ok(Parsed::Other);
    }
    let ip: Ipv4Hdr = ctx.load(ETH_HLEN).map_err(|_| Stat::DropMalformed)?;
    let ihl = ((ip.vihl & 0x0f) as usize) * 4;
    if ip.vihl >> 4 != 4 || ihl < 20 {
        return Err(Stat::DropMalformed);
    }
    let frag = u16::from_be(ip.frag_off);
    let offset = frag & 0x1fff;
    let more = frag & 0x2000 != 0;
    let mut pkt = Packet {
        tuple: Tuple {
            saddr: ip.saddr,
            daddr: ip.daddr,
            sport: 0,
            dport: 0,
        },
        proto: ip.proto,
        l4_off: ETH_HLEN + ihl,
        ip_id: ip.id,
        later_fragment: offset != 0,
        first_fragment: offset == 0 && more,
        l4_flags: 0,
    };
    if pkt.later_fragment {
        return match ip.proto {
            IPPROTO_TCP | IPPROTO_UDP | IPPROTO_ICMP => Ok(Parsed::Ipv4(pkt)),
            _ => Ok(Parsed::Other),
        };
    }
    match ip.proto {
        IPPROTO_TCP | IPPROTO_UDP => {
            let ports: [u16; 2] = ctx.load(pkt.l4_off).map_err(|_| Stat::DropMalformed)?;
            pkt.tuple.sport = ports[0];
            pkt.tuple.dport = ports[1];
            if ip.proto == IPPROTO_TCP {
                pkt.l4_flags = ctx
                    .load::<u8>(pkt.l4_off + 13)
                    .map_err(|_| Stat::DropMalformed)?;
            }
        }
        IPPROTO_ICMP => {
            let ty: u8 = ctx.load(pkt.l4_off).map_err(|_| Stat::DropMalformed)?;
            pkt.l4_flags = ty;
            match ty {
                // The identifier acts as the port: source port of a request, destination
                // port of a reply, so that a reply's tuple is the request's reversed.
                ICMP_ECHO_REQUEST => {
                    pkt.tuple.sport = ctx.load(pkt.l4_off + 4).map_err(|_| Stat::DropMalformed)?;
                }
                ICMP_ECHO_REPLY => {
                    pkt.tuple.dport = ctx.load(pkt.l4_off + 4).map_err(|_| Stat::DropMalformed)?;
                }
                ICMP_DEST_UNREACH | ICMP_TIME_EXCEEDED | ICMP_PARAMETERPROB => {
                    return Ok(Parsed::IcmpError(pkt));
                }
                _ => return Ok(Parsed::Other),
            }
        }
        _ => return Ok(Parsed::Other),
    }
    Ok(Parsed::Ipv4(pkt))
}

/// Sets the Ethernet addresses of a frame about to be redirected to a bridge port.
#[inline(always)]
pub fn set_macs(ctx: &TcContext, dst: &[u8; 6], src: &[u8; 6]) -> Result<(), Stat> {
    let mut macs = [0u8; 12];
    macs[..6].copy_from_slice(dst);
    macs[6..].copy_from_slice(src);
    ctx.store(0, &macs, 0).map_err(|_| Stat::DropCsumHelper)
}

/// Rewrites one IPv4 address at `off`: the L4 checksum (pseudo header, if the packet
/// carries an L4 header that has one), the IP header checksum, then the bytes.
#[inline(always)]
fn rewrite_addr(
    ctx: &TcContext,
    csum_off: usize,
    l4_addr: bool,
    mangled0: u64,
    off: usize,
    old: u32,
    new: u32,
) -> Result<(), Stat> {
    if old == new {
        return Ok(());
    }
    if l4_addr {
        ctx.l4_csum_replace(
            csum_off,
            old as u64,
            new as u64,
            BPF_F_PSEUDO_HDR as u64 | mangled0 | 4,
        )
        .map_err(|_| Stat::DropCsumHelper)?;
    }
    ctx.l3_csum_replace(IP_CSUM_OFF, old as u64, new as u64, 4)
        .map_err(|_| Stat::DropCsumHelper)?;
    ctx.store(off, &new, 0).map_err(|_| Stat::DropCsumHelper)
}

#[inline(always)]
pub fn l4_csum_off(proto: u8) -> usize {
    match proto {
        IPPROTO_TCP => 16,
        IPPROTO_UDP => 6,
        _ => 2,
    }
}

/// Rewrites `pkt`'s addresses and ports to `new`, fixing the IPv4 header checksum and the
/// L4 checksum incrementally. The helpers do the right thing for CHECKSUM_PARTIAL
/// (they only adjust the pseudo-header part) and, with `BPF_F_MARK_MANGLED_0`, leave a
/// zero (absent) UDP checksum alone. A later fragment has no L4 header: only L3 changes.
#[inline(always)]
pub fn rewrite(ctx: &TcContext, pkt: &Packet, new: &Tuple) -> Result<(), Stat> {
    let old = &pkt.tuple;
    let has_l4 = !pkt.later_fragment;
    let csum_off = pkt.l4_off + l4_csum_off(pkt.proto);
    let mangled0 = if pkt.proto == IPPROTO_UDP {
        BPF_F_MARK_MANGLED_0 as u64
    } else {
        0
    };
    // The pseudo header covers the addresses for TCP and UDP; ICMP has none.
    let l4_addr = has_l4 && pkt.proto != IPPROTO_ICMP;

    rewrite_addr(
        ctx,
        csum_off,
        l4_addr,
        mangled0,
        IP_SADDR_OFF,
        old.saddr,
        new.saddr,
    )?;
    rewrite_addr(
        ctx,
        csum_off,
        l4_addr,
        mangled0,
        IP_DADDR_OFF,
        old.daddr,
        new.daddr,
    )?;
    if !has_l4 {
        return Ok(());
    }
    if pkt.proto == IPPROTO_ICMP {
        // Echo identifier: `sport` of a request, `dport` of a reply.
        let (o, n) = if pkt.l4_flags == ICMP_ECHO_REQUEST {
            (old.sport, new.sport)
        } else {
            (old.dport, new.dport)
        };
        if o != n {
            ctx.l4_csum_replace(csum_off, o as u64, n as u64, 2)
                .map_err(|_| Stat::DropCsumHelper)?;
            ctx.store(pkt.l4_off + 4, &n, 0)
                .map_err(|_| Stat::DropCsumHelper)?;
        }
        return Ok(());
    }
    if old.sport != new.sport {
        ctx.l4_csum_replace(csum_off, old.sport as u64, new.sport as u64, mangled0 | 2)
            .map_err(|_| Stat::DropCsumHelper)?;
        ctx.store(pkt.l4_off, &new.sport, 0)
            .map_err(|_| Stat::DropCsumHelper)?;
    }
    if old.dport != new.dport {
        ctx.l4_csum_replace(csum_off, old.dport as u64, new.dport as u64, mangled0 | 2)
            .map_err(|_| Stat::DropCsumHelper)?;
        ctx.store(pkt.l4_off + 2, &new.dport, 0)
            .map_err(|_| Stat::DropCsumHelper)?;
    }
    Ok(())
}
