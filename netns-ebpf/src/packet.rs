//! Header parsing and rewriting of IPv4 packets with direct packet access: the headers
//! are pulled into the linear area once ([`Frame::new`]), read and written in place,
//! the IPv4 checksum updated inline. Only the L4 checksum goes through
//! `bpf_l4_csum_replace`, which knows whether the checksum is partial (offloaded),
//! complete or absent; it may move the packet, so pointers are taken again after it.
//! IPv4 options are handled by reading the real header length.

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR},
    programs::TcContext,
};
use netns_common::{IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP, Stat, Tuple, csum};

use crate::mem;

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

#[repr(C)]
#[derive(Clone, Copy)]
pub struct TcpHdr {
    pub sport: u16,
    pub dport: u16,
    pub seq: u32,
    pub ack: u32,
    pub doff_flags: [u8; 2],
    pub win: u16,
    pub check: u16,
    pub urg: u16,
}
const _: () = assert!(core::mem::size_of::<TcpHdr>() == TCP_HLEN);

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

/// Direct access to a frame's headers: the linear data between `data` and `end`,
/// every access bounds checked (the verifier demands it, and a short packet fails it).
#[derive(Clone, Copy)]
pub struct Frame {
    data: usize,
    end: usize,
}

/// What a parse reads at most: Ethernet, an IPv4 header with all options, a TCP header.
const HEADERS_LEN: u32 = (ETH_HLEN + 60 + TCP_HLEN) as u32;
/// Largest offset a read may start at (bounds the offset for the verifier).
const MAX_OFF: usize = HEADERS_LEN as usize;

impl Frame {
    /// The frame's headers, pulled into the linear area first if they are not all there
    /// (paged or GSO frames; almost never on veth).
    #[inline(always)]
    pub fn new(ctx: &TcContext) -> Frame {
        let f = Frame::at(ctx);
        let len = ctx.len();
        let want = if len < HEADERS_LEN { len } else { HEADERS_LEN } as usize;
        if f.data + want <= f.end {
            return f;
        }
        // A failed pull leaves the frame as it is: reads past its linear part fail.
        let _ = ctx.pull_data(want as u32);
        Frame::at(ctx)
    }

    /// The linear data as it is now (after a helper that may have moved it).
    #[inline(always)]
    pub fn at(ctx: &TcContext) -> Frame {
        Frame {
            data: ctx.data(),
            end: ctx.data_end(),
        }
    }

    /// A pointer to a `T` at `off`, if the frame's linear data holds it.
    #[inline(always)]
    pub fn ptr<T>(&self, off: usize) -> Option<*mut T> {
        if off > MAX_OFF {
            return None;
        }
        let p = self.data + off;
        if p + core::mem::size_of::<T>() > self.end {
            return None;
        }
        Some(p as *mut T)
    }

    #[inline(always)]
    pub fn get<T: Copy>(&self, off: usize) -> Option<T> {
        // SAFETY: bounds checked; packet data is plain bytes (x86 loads unaligned).
        self.ptr::<T>(off).map(|p| unsafe { *p })
    }

    #[inline(always)]
    pub fn ip(&self) -> Option<*mut Ipv4Hdr> {
        self.ptr::<Ipv4Hdr>(ETH_HLEN)
    }
}

#[inline(always)]
pub fn eth(ctx: &TcContext) -> Result<EthHdr, Stat> {
    Frame::at(ctx).get::<EthHdr>(0).ok_or(Stat::DropMalformed)
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
    let f = Frame::new(ctx);
    let proto: u16 = match f.get::<u16>(ETH_PROTO_OFF) {
        Some(p) => u16::from_be(p),
        None => return Ok(Parsed::Other),
    };
    if proto != ETH_P_IP {
        return Ok(Parsed::Other);
    }
    let ip: Ipv4Hdr = f.get(ETH_HLEN).ok_or(Stat::DropMalformed)?;
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
    // Each L4 header is read through one pointer, bounds checked once: LLVM would
    // otherwise fold the checks of separate reads into one the verifier cannot follow.
    match ip.proto {
        IPPROTO_TCP => {
            let th: TcpHdr = f.get(pkt.l4_off).ok_or(Stat::DropMalformed)?;
            pkt.tuple.sport = th.sport;
            pkt.tuple.dport = th.dport;
            let doff = (th.doff_flags[0] >> 4) as usize * 4;
            if doff < TCP_HLEN || len < pkt.l4_off + doff {
                return Err(Stat::DropMalformed);
            }
            let flags = th.doff_flags[1];
            pkt.l4_flags = flags;
            pkt.tcp_seq = u32::from_be(th.seq);
            pkt.tcp_win = u16::from_be(th.win);
            let payload = (u16::from_be(ip.tot_len) as u32).saturating_sub((ihl + doff) as u32);
            pkt.tcp_seg_len =
                payload + (flags & TCP_SYN != 0) as u32 + (flags & TCP_FIN != 0) as u32;
        }
        IPPROTO_UDP => {
            let uh: [u16; UDP_HLEN / 2] = f.get(pkt.l4_off).ok_or(Stat::DropMalformed)?;
            pkt.tuple.sport = uh[0];
            pkt.tuple.dport = uh[1];
        }
        _ => {
            let ih: [u16; ICMP_HLEN / 2] = f.get(pkt.l4_off).ok_or(Stat::DropMalformed)?;
            // Type and code in the first word, as they lie in memory.
            let ty = ih[0].to_ne_bytes()[0];
            pkt.l4_flags = ty;
            match icmp_query(ty) {
                // The identifier acts as the port: source port of a request, destination
                // port of a reply, so that a reply's tuple is the request's reversed.
                Some(true) => pkt.tuple.sport = ih[ICMP_ID / 2],
                Some(false) => pkt.tuple.dport = ih[ICMP_ID / 2],
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

/// Sets the Ethernet addresses of a frame about to be redirected.
#[inline(always)]
pub fn set_macs(ctx: &TcContext, dst: &[u8; 6], src: &[u8; 6]) -> Result<(), Stat> {
    let p = Frame::at(ctx)
        .ptr::<EthHdr>(0)
        .ok_or(Stat::DropCsumHelper)?;
    // SAFETY: bounds checked by `ptr`.
    unsafe {
        mem::copy_mac(&raw mut (*p).dst, dst);
        mem::copy_mac(&raw mut (*p).src, src);
    }
    Ok(())
}

/// Decrements the TTL of a packet about to be forwarded, updating the header checksum.
/// False (nothing changed) when it would expire: the stack sends the time-exceeded
/// error then.
#[inline(always)]
pub fn dec_ttl(ctx: &TcContext) -> bool {
    let Some(ip) = Frame::at(ctx).ip() else {
        return false;
    };
    // SAFETY: bounds checked by `ip`. The TTL and protocol share a checksum word.
    unsafe {
        let w = (ip as *const u8).add(8) as *const u16;
        let old = *w;
        if (*ip).ttl <= 1 {
            return false;
        }
        (*ip).ttl -= 1;
        (*ip).check = csum::replace2((*ip).check, old, *w);
    }
    true
}

/// Fixes the L4 checksum at `csum_off` for a field that changes from `old` to `new`
/// (`flags`: its size, and whether it is in the pseudo header).
#[inline(always)]
fn l4_fix(ctx: &TcContext, csum_off: usize, old: u64, new: u64, flags: u64) -> Result<(), Stat> {
    if old == new {
        return Ok(());
    }
    ctx.l4_csum_replace(csum_off, old, new, flags)
        .map_err(|_| Stat::DropCsumHelper)
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
/// L4 checksum incrementally. The L4 helper does the right thing for CHECKSUM_PARTIAL
/// (it only adjusts the pseudo-header part) and, with `BPF_F_MARK_MANGLED_0`, leaves a
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
    // Echo identifier: `sport` of a request, `dport` of a reply.
    let icmp = pkt.proto == IPPROTO_ICMP;
    let request = icmp_query(pkt.l4_flags) == Some(true);

    // The L4 checksum first, through the helper: it may move the packet data.
    if has_l4 {
        if !icmp {
            // The pseudo header covers the addresses for TCP and UDP; ICMP has none.
            let pseudo = BPF_F_PSEUDO_HDR as u64 | mangled0 | 4;
            l4_fix(ctx, csum_off, old.saddr as u64, new.saddr as u64, pseudo)?;
            l4_fix(ctx, csum_off, old.daddr as u64, new.daddr as u64, pseudo)?;
            l4_fix(
                ctx,
                csum_off,
                old.sport as u64,
                new.sport as u64,
                mangled0 | 2,
            )?;
            l4_fix(
                ctx,
                csum_off,
                old.dport as u64,
                new.dport as u64,
                mangled0 | 2,
            )?;
        } else if request {
            l4_fix(ctx, csum_off, old.sport as u64, new.sport as u64, 2)?;
        } else {
            l4_fix(ctx, csum_off, old.dport as u64, new.dport as u64, 2)?;
        }
    }
    // Then the bytes and the IPv4 checksum, in place.
    let f = Frame::at(ctx);
    let ip = f.ip().ok_or(Stat::DropCsumHelper)?;
    // SAFETY: bounds checked by `ip`.
    unsafe {
        let mut check = (*ip).check;
        if old.saddr != new.saddr {
            check = csum::replace4(check, old.saddr, new.saddr);
            (*ip).saddr = new.saddr;
        }
        if old.daddr != new.daddr {
            check = csum::replace4(check, old.daddr, new.daddr);
            (*ip).daddr = new.daddr;
        }
        (*ip).check = check;
    }
    if !has_l4 {
        return Ok(());
    }
    if icmp {
        let id = f
            .ptr::<u16>(pkt.l4_off + ICMP_ID)
            .ok_or(Stat::DropCsumHelper)?;
        // SAFETY: bounds checked by `ptr`.
        unsafe { *id = if request { new.sport } else { new.dport } };
        return Ok(());
    }
    let ports = f
        .ptr::<[u16; 2]>(pkt.l4_off + L4_SPORT)
        .ok_or(Stat::DropCsumHelper)?;
    // SAFETY: bounds checked by `ptr`.
    unsafe { *ports = [new.sport, new.dport] };
    Ok(())
}
