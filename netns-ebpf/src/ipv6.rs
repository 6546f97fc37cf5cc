//! IPv6 header parsing (extension headers walked with a bounded loop) and rewriting.
//! IPv6 has no header checksum; the L4 checksums (ICMPv6's too) cover the addresses
//! through the pseudo header, so an address change is one `bpf_csum_diff` over the 16
//! bytes folded into the L4 checksum with `BPF_F_PSEUDO_HDR` (right for
//! CHECKSUM_PARTIAL as well: the helper then adjusts only the pseudo-header part).

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR},
    helpers::bpf_csum_diff,
    programs::TcContext,
};
use netns_common::{IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP, In6, Stat, Tuple6};

use crate::packet::{ETH_HLEN, L4, L4_DPORT, L4_SPORT, TCP_DOFF_FLAGS, l4_csum_off};

pub const ETH_P_IPV6: u16 = 0x86dd;
pub const IP6_HLEN: usize = 40;
pub const IP6_SADDR_OFF: usize = ETH_HLEN + 8;
pub const IP6_DADDR_OFF: usize = ETH_HLEN + 24;
/// Offsets inside an IPv6 header (also a quoted one).
pub const IP6H_SADDR: usize = 8;
pub const IP6H_DADDR: usize = 24;

/// Extension headers walked before giving up (`drop_ipv6_ext_hdrs` for a container's
/// packet; the host's own passes untouched).
const MAX_EXT_HDRS: u32 = 6;
const NEXTHDR_HOP: u8 = 0;
const NEXTHDR_ROUTING: u8 = 43;
const NEXTHDR_FRAGMENT: u8 = 44;
const NEXTHDR_AUTH: u8 = 51;
const NEXTHDR_DEST: u8 = 60;

pub const ICMP6_DEST_UNREACH: u8 = 1;
pub const ICMP6_PKT_TOO_BIG: u8 = 2;
pub const ICMP6_TIME_EXCEEDED: u8 = 3;
pub const ICMP6_PARAMPROB: u8 = 4;
pub const ICMP6_ECHO_REQUEST: u8 = 128;
pub const ICMP6_ECHO_REPLY: u8 = 129;
pub const ND_ROUTER_ADVERT: u8 = 134;
pub const ND_NEIGHBOR_SOLICIT: u8 = 135;
pub const ND_NEIGHBOR_ADVERT: u8 = 136;
pub const ND_REDIRECT: u8 = 137;
/// ICMPv6 identifier offset (echo), and where an error's quoted packet starts.
pub const ICMP6_ID: usize = 4;
pub const ICMP6_QUOTE: usize = 8;

#[repr(C)]
#[derive(Clone, Copy)]
pub struct Ip6Hdr {
    pub vtc_flow: [u8; 4],
    pub payload_len: u16,
    pub nexthdr: u8,
    pub hop_limit: u8,
    pub saddr: In6,
    pub daddr: In6,
}

/// What the datapath needs of an IPv6 packet.
#[derive(Clone, Copy)]
pub struct Packet6 {
    pub tuple: Tuple6,
    /// The upper-layer protocol (after the extension headers).
    pub proto: u8,
    pub l4_off: usize,
    /// A Fragment header was seen: its identification (network order).
    pub fragment: bool,
    pub frag_id: u32,
    /// Fragment offset != 0: no L4 header in this packet.
    pub later_fragment: bool,
    /// IPv6 payload length (extension headers included).
    pub payload_len: u32,
    /// TCP flags, ICMPv6 type.
    pub l4_flags: u8,
    pub l4: L4,
    /// An ICMPv6 error: it quotes a packet of some flow at `l4_off + ICMP6_QUOTE`.
    pub icmp_error: bool,
}

impl Packet6 {
    pub const EMPTY: Packet6 = Packet6 {
        tuple: Tuple6 {
            saddr: In6::ZERO,
            daddr: In6::ZERO,
            sport: 0,
            dport: 0,
        },
        proto: 0,
        l4_off: 0,
        fragment: false,
        frag_id: 0,
        later_fragment: false,
        payload_len: 0,
        l4_flags: 0,
        l4: L4::AddrOnly,
        icmp_error: false,
    };
}

#[inline(always)]
fn load<T>(ctx: &TcContext, off: usize) -> Result<T, Stat> {
    ctx.load::<T>(off).map_err(|_| Stat::DropMalformed)
}

/// Parses the IPv6 header at `ETH_HLEN`, its extension headers and the ports (or echo
/// identifier) into `out`. A function of its own: the walk's locals stay off the
/// callers' frames.
#[inline(never)]
pub fn parse6(ctx: &TcContext, out: &mut Packet6) -> Result<(), Stat> {
    let ip: Ip6Hdr = load(ctx, ETH_HLEN)?;
    if ip.vtc_flow[0] >> 4 != 6 {
        return Err(Stat::DropMalformed);
    }
    let mut p = Packet6::EMPTY;
    p.tuple.saddr = ip.saddr;
    p.tuple.daddr = ip.daddr;
    p.payload_len = u16::from_be(ip.payload_len) as u32;
    let mut nh = ip.nexthdr;
    let mut off = ETH_HLEN + IP6_HLEN;
    let mut i = 0;
    while i < MAX_EXT_HDRS {
        match nh {
            NEXTHDR_HOP | NEXTHDR_ROUTING | NEXTHDR_DEST => {
                let h: [u8; 2] = load(ctx, off)?;
                nh = h[0];
                off += (h[1] as usize + 1) * 8;
            }
            NEXTHDR_AUTH => {
                let h: [u8; 2] = load(ctx, off)?;
                nh = h[0];
                off += (h[1] as usize + 2) * 4;
            }
            NEXTHDR_FRAGMENT => {
                let f: [u8; 8] = load(ctx, off)?;
                nh = f[0];
                let fo = u16::from_be_bytes([f[2], f[3]]);
                p.fragment = true;
                p.frag_id = u32::from_ne_bytes([f[4], f[5], f[6], f[7]]);
                off += 8;
                if fo >> 3 != 0 {
                    p.later_fragment = true;
                    break;
                }
            }
            _ => break,
        }
        i += 1;
    }
    if !p.later_fragment
        && matches!(
            nh,
            NEXTHDR_HOP | NEXTHDR_ROUTING | NEXTHDR_DEST | NEXTHDR_AUTH | NEXTHDR_FRAGMENT
        )
    {
        return Err(Stat::DropIpv6ExtHdrs);
    }
    p.proto = nh;
    p.l4_off = off;
    p.l4 = match nh {
        IPPROTO_TCP | IPPROTO_UDP => L4::Ports,
        IPPROTO_ICMPV6 => L4::IcmpQuery,
        _ => L4::AddrOnly,
    };
    if p.later_fragment || p.l4 == L4::AddrOnly {
        *out = p;
        return Ok(());
    }
    let len = ctx.len() as usize;
    match nh {
        IPPROTO_TCP | IPPROTO_UDP => {
            let hlen = if nh == IPPROTO_TCP { 20 } else { 8 };
            if len < off + hlen {
                return Err(Stat::DropMalformed);
            }
            let ports: [u16; 2] = load(ctx, off + L4_SPORT)?;
            p.tuple.sport = ports[0];
            p.tuple.dport = ports[1];
            if nh == IPPROTO_TCP {
                let df: [u8; 2] = load(ctx, off + TCP_DOFF_FLAGS)?;
                p.l4_flags = df[1];
            }
        }
        _ => {
            if len < off + 8 {
                return Err(Stat::DropMalformed);
            }
            let ty: u8 = load(ctx, off)?;
            p.l4_flags = ty;
            match ty {
                ICMP6_ECHO_REQUEST => p.tuple.sport = load(ctx, off + ICMP6_ID)?,
                ICMP6_ECHO_REPLY => p.tuple.dport = load(ctx, off + ICMP6_ID)?,
                ICMP6_DEST_UNREACH | ICMP6_PKT_TOO_BIG | ICMP6_TIME_EXCEEDED | ICMP6_PARAMPROB => {
                    p.icmp_error = true
                }
                _ => p.l4 = L4::IcmpOther,
            }
        }
    }
    *out = p;
    Ok(())
}

/// The L4 checksum change of replacing 16 address bytes `old` by `new`.
#[inline(always)]
pub fn addr_diff(old: &In6, new: &In6) -> Result<u64, Stat> {
    let mut o = old.0;
    let mut n = new.0;
    // SAFETY: both buffers are 16 bytes on our stack, sizes given in bytes.
    let d = unsafe { bpf_csum_diff(o.as_mut_ptr(), 16, n.as_mut_ptr(), 16, 0) };
    if d < 0 {
        return Err(Stat::DropCsumHelper);
    }
    Ok(d as u64)
}

/// Rewrites the address at `off` to `new`; `csum_off`: the L4 checksum that covers
/// it (None for a later fragment: no L4 header), `pseudo` whether through the pseudo
/// header (the packet's own addresses) or as plain data (a quoted packet's).
#[inline(always)]
pub fn rewrite_addr(
    ctx: &TcContext,
    off: usize,
    old: &In6,
    new: &In6,
    csum_off: Option<usize>,
    flags: u64,
) -> Result<(), Stat> {
    if old == new {
        return Ok(());
    }
    if let Some(c) = csum_off {
        let d = addr_diff(old, new)?;
        ctx.l4_csum_replace(c, 0, d, flags)
            .map_err(|_| Stat::DropCsumHelper)?;
    }
    ctx.store(off, new, 0).map_err(|_| Stat::DropCsumHelper)
}

/// Rewrites `pkt`'s addresses and ports (echo identifier) to `new`.
#[inline(never)]
pub fn rewrite6(ctx: &TcContext, pkt: &Packet6, new: &Tuple6) -> Result<(), Stat> {
    let old = &pkt.tuple;
    let has_l4 = !pkt.later_fragment && pkt.l4 != L4::AddrOnly;
    let csum_off = pkt.l4_off
        + if pkt.proto == IPPROTO_ICMPV6 {
            2
        } else {
            l4_csum_off(pkt.proto)
        };
    // A zero UDP checksum is invalid over IPv6 (RFC 8200): none to keep, but the
    // helper's flag keeps a rewritten sum from becoming 0.
    let mangled0 = if pkt.proto == IPPROTO_UDP {
        BPF_F_MARK_MANGLED_0 as u64
    } else {
        0
    };
    let c = if has_l4 { Some(csum_off) } else { None };
    let pseudo = BPF_F_PSEUDO_HDR as u64 | mangled0;
    rewrite_addr(ctx, IP6_SADDR_OFF, &old.saddr, &new.saddr, c, pseudo)?;
    rewrite_addr(ctx, IP6_DADDR_OFF, &old.daddr, &new.daddr, c, pseudo)?;
    if !has_l4 {
        return Ok(());
    }
    if pkt.proto == IPPROTO_ICMPV6 {
        let (o, n) = if pkt.l4_flags == ICMP6_ECHO_REQUEST {
            (old.sport, new.sport)
        } else {
            (old.dport, new.dport)
        };
        if o != n {
            ctx.l4_csum_replace(csum_off, o as u64, n as u64, 2)
                .map_err(|_| Stat::DropCsumHelper)?;
            ctx.store(pkt.l4_off + ICMP6_ID, &n, 0)
                .map_err(|_| Stat::DropCsumHelper)?;
        }
        return Ok(());
    }
    if old.sport != new.sport {
        ctx.l4_csum_replace(csum_off, old.sport as u64, new.sport as u64, mangled0 | 2)
            .map_err(|_| Stat::DropCsumHelper)?;
        ctx.store(pkt.l4_off + L4_SPORT, &new.sport, 0)
            .map_err(|_| Stat::DropCsumHelper)?;
    }
    if old.dport != new.dport {
        ctx.l4_csum_replace(csum_off, old.dport as u64, new.dport as u64, mangled0 | 2)
            .map_err(|_| Stat::DropCsumHelper)?;
        ctx.store(pkt.l4_off + L4_DPORT, &new.dport, 0)
            .map_err(|_| Stat::DropCsumHelper)?;
    }
    Ok(())
}

/// The link-local address the kernel gives an interface with MAC `mac` (EUI-64,
/// fe80::/64): the only link-local source a container may send from.
#[inline(always)]
pub fn eui64_link_local(mac: &[u8; 6]) -> In6 {
    In6::from_octets([
        0xfe,
        0x80,
        0,
        0,
        0,
        0,
        0,
        0,
        mac[0] ^ 0x02,
        mac[1],
        mac[2],
        0xff,
        0xfe,
        mac[3],
        mac[4],
        mac[5],
    ])
}

/// ff00::/8.
#[inline(always)]
pub fn is_multicast(a: &In6) -> bool {
    u32::from_be(a.0[0]) >> 24 == 0xff
}
