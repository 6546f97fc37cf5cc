//! netns eBPF datapath: masquerade (SNAT) and port forwarding (DNAT) for containers on
//! a Linux bridge, with a conntrack-like LRU map on the fast path. No netfilter.
//!
//! Attach points (TC, TCX links on kernels >= 6.6):
//! - uplink egress: rewrite the source of container flows leaving the host;
//! - uplink ingress: rewrite the destination of replies and of port-forwarded flows;
//! - bridge port ingress (host end of each container veth): drop spoofed sources.
#![no_std]
#![no_main]

mod conntrack;
mod maps;
mod nat;
mod packet;
mod stats;

use aya_ebpf::{bindings::TC_ACT_OK, bindings::TC_ACT_SHOT, macros::classifier, programs::TcContext};

use crate::stats::Verdict;

#[classifier]
pub fn netns_uplink_egress(ctx: TcContext) -> i32 {
    verdict(nat::uplink_egress(&ctx))
}

#[classifier]
pub fn netns_uplink_ingress(ctx: TcContext) -> i32 {
    verdict(nat::uplink_ingress(&ctx))
}

#[classifier]
pub fn netns_port_ingress(ctx: TcContext) -> i32 {
    verdict(nat::port_ingress(&ctx))
}

/// Every drop is counted with its reason; everything else continues down the stack.
#[inline(always)]
fn verdict(v: Verdict) -> i32 {
    match v {
        Verdict::Pass => TC_ACT_OK,
        Verdict::Drop(reason) => {
            stats::inc(reason);
            TC_ACT_SHOT
        }
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
