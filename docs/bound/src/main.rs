//! The least a TC fast path can do per packet, as a bound for issue 12's rate goals:
//! no conntrack, no route lookup, no checks, targets and MACs compiled in (run.sh
//! writes them to `$BOUND_CFG`). Only UDP/IPv4, only the bench's addresses.
//! - `bound_in` (uplink ingress): DNAT uplink:8081 -> container a:5002, the MACs,
//!   `bpf_redirect_peer` into container a, as netns's fast path does.
//! - `bound_port` (container a's bridge port ingress): to container b,
//!   `bpf_redirect_peer`; to outside the /16, SNAT to the uplink address, the MACs,
//!   `bpf_redirect` out of the uplink.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::TC_ACT_OK,
    helpers::{bpf_redirect, bpf_redirect_peer},
    macros::classifier,
    programs::TcContext,
};

/// Addresses and ports in network byte order, as they sit in the packet.
#[repr(C)]
pub struct Cfg {
    ctr_ip: u32,
    ctr2_ip: u32,
    uplink_ip: u32,
    fwd_port: u16,
    ctr_port: u16,
    h0: u32,
    h1: u32,
    up: u32,
    ctr_mac: [u8; 6],
    br_mac: [u8; 6],
    wan_mac: [u8; 6],
    up_mac: [u8; 6],
}

include!(env!("BOUND_CFG"));

const IP_CSUM: usize = 14 + 10;
const PROTO: usize = 14 + 9;
const SADDR: usize = 14 + 12;
const DADDR: usize = 14 + 16;
const DPORT: usize = 14 + 20 + 2;
const UDP_CSUM: usize = 14 + 20 + 6;
/// Ethernet, IPv4 without options, UDP.
const HDRS: usize = 42;
const F_PSEUDO: u64 = 0x10;
const F_MANGLED_0: u64 = 0x20;

/// The packet's start, if it holds [`HDRS`] bytes (again after every helper that may
/// move packet data).
#[inline(always)]
fn headers(ctx: &TcContext) -> Option<usize> {
    let s = ctx.data();
    (s + HDRS <= ctx.data_end()).then_some(s)
}

#[inline(always)]
fn at<T>(base: usize, off: usize) -> T {
    // SAFETY: `base` is from `headers`, and every offset is inside it.
    unsafe { core::ptr::read_unaligned((base + off) as *const T) }
}

#[inline(always)]
fn put<T>(base: usize, off: usize, v: T) {
    // SAFETY: as for `at`, after the last helper that may move packet data.
    unsafe { core::ptr::write_unaligned((base + off) as *mut T, v) }
}

/// Writes the IPv4 address at `off` (`old` -> `new`) with both checksums fixed;
/// returns the packet's start again.
#[inline(always)]
fn set_addr(ctx: &TcContext, off: usize, old: u32, new: u32) -> Option<usize> {
    let _ = ctx.l3_csum_replace(IP_CSUM, old as u64, new as u64, 4);
    let _ = ctx.l4_csum_replace(UDP_CSUM, old as u64, new as u64, F_PSEUDO | F_MANGLED_0 | 4);
    let s = headers(ctx)?;
    put(s, off, new);
    Some(s)
}

#[classifier]
pub fn bound_in(ctx: TcContext) -> i32 {
    let Some(s) = headers(&ctx) else {
        return TC_ACT_OK;
    };
    let (d, dp) = (at::<u32>(s, DADDR), at::<u16>(s, DPORT));
    if at::<u8>(s, PROTO) != 17 || d != C.uplink_ip || dp != C.fwd_port {
        return TC_ACT_OK;
    }
    let _ = ctx.l4_csum_replace(UDP_CSUM, dp as u64, C.ctr_port as u64, F_MANGLED_0 | 2);
    let Some(s) = set_addr(&ctx, DADDR, d, C.ctr_ip) else {
        return TC_ACT_OK;
    };
    put(s, DPORT, C.ctr_port);
    put(s, 0, C.ctr_mac);
    put(s, 6, C.br_mac);
    // SAFETY: a plain helper call.
    unsafe { bpf_redirect_peer(C.h0, 0) as i32 }
}

#[classifier]
pub fn bound_port(ctx: TcContext) -> i32 {
    let Some(s) = headers(&ctx) else {
        return TC_ACT_OK;
    };
    let (sa, d) = (at::<u32>(s, SADDR), at::<u32>(s, DADDR));
    if at::<u16>(s, 12) != 0x0008 || at::<u8>(s, PROTO) != 17 {
        return TC_ACT_OK;
    }
    if d == C.ctr2_ip {
        // SAFETY: a plain helper call.
        return unsafe { bpf_redirect_peer(C.h1, 0) as i32 };
    }
    if sa != C.ctr_ip || d & 0xffff == C.ctr_ip & 0xffff {
        return TC_ACT_OK;
    }
    let Some(s) = set_addr(&ctx, SADDR, sa, C.uplink_ip) else {
        return TC_ACT_OK;
    };
    put(s, 0, C.wan_mac);
    put(s, 6, C.up_mac);
    // SAFETY: a plain helper call.
    unsafe { bpf_redirect(C.up, 0) as i32 }
}

#[panic_handler]
fn panic(_: &core::panic::PanicInfo) -> ! {
    loop {}
}
