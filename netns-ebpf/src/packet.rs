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
/// Offsets of the fields the datapath touches, one definition each. Frame offsets:
pub const ETH_PROTO_OFF: usize = 12;
pub const IP_CSUM_OFF: usize = ETH_HLEN + IPH_CSUM;
pub const IP_SADDR_OFF: usize = ETH_HLEN + IPH_SADDR;
pub const IP_DADDR_OFF: usize = ETH_HLEN + IPH_DADDR;
pub const ARP_SENDER_MAC_OFF: usize = ETH_HLEN + 8;
pub const ARP_SENDER_IP_OFF: usize = ETH_HLEN + 14;
/// Offsets inside an IPv4 header (also a quoted one, in an ICMP error):
pub const IPH_CSUM: usize = 10;
pub const IPH_SADDR: usize = 12;
pub const IPH_DADDR: usize = 16;
/// Offsets inside an L4 header: ports, TCP data offset + flags, ICMP checksum and
/// identifier, and the start of the header an ICMP error quotes.
pub const L4_SPORT: usize = 0;
pub const L4_DPORT: usize = 2;
pub const TCP_DOFF_FLAGS: usize = 12;
pub const TCP_SEQ: usize = 4;
pub const TCP_WIN: usize = 14;
pub const ICMP_CSUM: usize = 2;
pub const ICMP_ID: usize = 4;
pub const ICMP_QUOTE: usize = 8;

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
    /// Offset != 0 and more-fragments clear: the datagram's last fragment.
    pub last_fragment: bool,
    /// IP payload length, and (fragments) the offset just past this fragment's payload.
    pub l3_payload: u32,
    pub frag_end: u32,
    /// TCP (host order): sequence number, the sequence space the segment takes (payload
    /// plus SYN and FIN), and the raw window.
    pub tcp_seq: u32,
    pub tcp_seg_len: u32,
    pub tcp_win: u16,
    /// TCP flags, ICMP type.
    pub l4_flags: u8,
    /// What identifies the flow beyond the addresses.
    pub l4: L4,
}

impl Packet {
    pub const EMPTY: Packet = Packet {
        tuple: Tuple {
            saddr: 0,
            daddr: 0,
            sport: 0,
            dport: 0,
        },
        proto: 0,
        l4_off: 0,
        ip_id: 0,
        later_fragment: false,
        first_fragment: false,
        last_fragment: false,
        l3_payload: 0,
        frag_end: 0,
        tcp_seq: 0,
        tcp_seg_len: 0,
        tcp_win: 0,
        l4_flags: 0,
        l4: L4::AddrOnly,
    };
}

/// How a packet's flow is told apart from others to the same peer.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum L4 {
    /// TCP and UDP: ports.
    Ports,
    /// ICMP queries (echo, timestamp, information, address mask): the identifier.
    IcmpQuery,
    /// ICMP that is neither a query nor an error (redirect, router advert...):
    /// nothing to translate.
    IcmpOther,
    /// Any other protocol (GRE, ESP, SCTP...): the addresses alone, as netfilter's
    /// generic protocol handler.
    AddrOnly,
}

/// ICMP types that carry an identifier, requests and replies (RFC 792, 950).
#[inline(always)]
pub fn icmp_query(ty: u8) -> Option<bool> {
    match ty {
        8 | 13 | 15 | 17 => Some(true),
        0 | 14 | 16 | 18 => Some(false),
        _ => None,
    }
}

pub const ICMP_REDIRECT: u8 = 5;
pub const ICMP_ROUTER_ADVERT: u8 = 9;

/// Shortest header that must be there before a packet is touched: a TCP header cut
/// short is malformed (and would make the checksum helpers fail at the checksum's
/// offset).
const TCP_HLEN: usize = 20;
const UDP_HLEN: usize = 8;
const ICMP_HLEN: usize = 8;

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

pub enum Parsed {
    /// Not IPv4.
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

/// What [`parse_into`] found.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Other,
    Ipv4,
    IcmpError,
}

/// [`parse`] as a function of its own, into `out` (a BPF function cannot return a
/// struct): keeps the parser's locals off the callers' stack frames.
#[inline(never)]
pub fn parse_into(ctx: &TcContext, out: &mut Packet) -> Result<Kind, Stat> {
    Ok(match parse(ctx)? {
        Parsed::Other => Kind::Other,
        Parsed::Ipv4(p) => {
            *out = p;
            Kind::Ipv4
        }
        Parsed::IcmpError(p) => {
            *out = p;
            Kind::IcmpError
        }
    })
}

/// Parses Ethernet + IPv4 + the ports (or ICMP identifier) of TCP, UDP and ICMP.
#[inline(always)]
fn parse(ctx: &TcContext) -> Result<Parsed, Stat> {
    let proto: u16 = match ctx.load::<u16>(ETH_PROTO_OFF) {
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
    let l4 = match ip.proto {
        IPPROTO_TCP | IPPROTO_UDP => L4::Ports,
        IPPROTO_ICMP => L4::IcmpQuery,
        _ => L4::AddrOnly,
    };
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
        last_fragment: offset != 0 && !more,
        l3_payload: (u16::from_be(ip.tot_len) as u32).saturating_sub(ihl as u32),
        frag_end: (offset as u32) * 8
            + (u16::from_be(ip.tot_len) as u32).saturating_sub(ihl as u32),
        tcp_seq: 0,
        tcp_seg_len: 0,
        tcp_win: 0,
        l4_flags: 0,
        l4,
    };
    if pkt.later_fragment || l4 == L4::AddrOnly {
        return Ok(Parsed::Ipv4(pkt));
    }
    let len = ctx.len() as usize;
    match ip.proto {
        IPPROTO_TCP | IPPROTO_UDP => {
            let hlen = if ip.proto == IPPROTO_TCP {
                TCP_HLEN
            } else {
                UDP_HLEN
            };
            if len < pkt.l4_off + hlen {
                return Err(Stat::DropMalformed);
            }
            let ports: [u16; 2] = ctx
                .load(pkt.l4_off + L4_SPORT)
                .map_err(|_| Stat::DropMalformed)?;
            pkt.tuple.sport = ports[0];
            pkt.tuple.dport = ports[1];
            if ip.proto == IPPROTO_TCP {
                let doff_flags: [u8; 2] = ctx
                    .load(pkt.l4_off + TCP_DOFF_FLAGS)
                    .map_err(|_| Stat::DropMalformed)?;
                let doff = (doff_flags[0] >> 4) as usize * 4;
                if doff < TCP_HLEN || len < pkt.l4_off + doff {
                    return Err(Stat::DropMalformed);
                }
                pkt.l4_flags = doff_flags[1];
                let seq: u32 = ctx
                    .load(pkt.l4_off + TCP_SEQ)
                    .map_err(|_| Stat::DropMalformed)?;
                let win: u16 = ctx
                    .load(pkt.l4_off + TCP_WIN)
                    .map_err(|_| Stat::DropMalformed)?;
                pkt.tcp_seq = u32::from_be(seq);
                pkt.tcp_win = u16::from_be(win);
                let payload = (u16::from_be(ip.tot_len) as u32).saturating_sub((ihl + doff) as u32);
                let flags = doff_flags[1];
                pkt.tcp_seg_len =
                    payload + (flags & TCP_SYN != 0) as u32 + (flags & TCP_FIN != 0) as u32;
            }
        }
        _ => {
            if len < pkt.l4_off + ICMP_HLEN {
                return Err(Stat::DropMalformed);
            }
            let ty: u8 = ctx.load(pkt.l4_off).map_err(|_| Stat::DropMalformed)?;
            pkt.l4_flags = ty;
            match icmp_query(ty) {
                // The identifier acts as the port: source port of a request, destination
                // port of a reply, so that a reply's tuple is the request's reversed.
                Some(true) => {
                    pkt.tuple.sport = ctx
                        .load(pkt.l4_off + ICMP_ID)
                        .map_err(|_| Stat::DropMalformed)?;
                }
                Some(false) => {
                    pkt.tuple.dport = ctx
                        .load(pkt.l4_off + ICMP_ID)
                        .map_err(|_| Stat::DropMalformed)?;
                }
                None => match ty {
                    ICMP_DEST_UNREACH | ICMP_TIME_EXCEEDED | ICMP_PARAMETERPROB => {
                        return Ok(Parsed::IcmpError(pkt));
                    }
                    _ => pkt.l4 = L4::IcmpOther,
                },
            }
        }
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
#[inline(never)]
pub fn rewrite(ctx: &TcContext, pkt: &Packet, new: &Tuple) -> Result<(), Stat> {
    let old = &pkt.tuple;
    // A later fragment has no L4 header; other protocols' headers are left alone (as
    // netfilter's generic NAT does: their checksums, if any, do not cover the addresses).
    let has_l4 = !pkt.later_fragment && pkt.l4 != L4::AddrOnly;
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
        let (o, n) = if icmp_query(pkt.l4_flags) == Some(true) {
            (old.sport, new.sport)
        } else {
            (old.dport, new.dport)
        };
        if o != n {
            ctx.l4_csum_replace(csum_off, o as u64, n as u64, 2)
                .map_err(|_| Stat::DropCsumHelper)?;
            ctx.store(pkt.l4_off + ICMP_ID, &n, 0)
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
