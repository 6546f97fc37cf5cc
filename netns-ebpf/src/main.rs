//! netns eBPF datapath: masquerade (SNAT) and port forwarding (DNAT) for containers on
//! a Linux bridge, with a conntrack-like LRU map on the fast path. No netfilter.
//!
//! Attach points (TC, TCX links on kernels >= 6.6):
//! - uplink egress: rewrite the source of container flows leaving the host;
//! - uplink ingress: rewrite the destination of replies and of port-forwarded flows;
//! - bridge port ingress (host end of each container veth): drop spoofed sources.
//!
//! IPv6 (`--ip6`): the same programs check container IPv6 at bridge ports and do
//! NAT66 masquerade on the uplink (`nat6`, `conntrack6`).
#![no_std]
#![no_main]

mod conntrack;
mod conntrack6;
mod fastpath;
mod frag;
mod icmp;
mod ipv6;
mod maps;
mod mem;
mod nat;
mod nat6;
mod packet;
mod portfwd;
mod sock;
mod stats;
mod sweep;

use aya_ebpf::{
    bindings::{TC_ACT_SHOT, TC_ACT_UNSPEC},
    helpers::{bpf_ktime_get_ns, bpf_redirect, bpf_redirect_neigh, bpf_redirect_peer},
    macros::{cgroup_sock_addr, classifier},
    programs::{SockAddrContext, TcContext},
};

use aya_log_ebpf::warn;
use netns_common::Stat;

use crate::{maps::LOG_LAST, stats::Verdict};

/// At most one datapath log line per CPU per this many nanoseconds: a container
/// sending bad packets must not flood the log.
const LOG_INTERVAL_NS: u64 = 100_000_000;

#[inline(always)]
fn log_allowed() -> bool {
    let Some(last) = LOG_LAST.get_ptr_mut(0) else {
        return false;
    };
    // SAFETY: per-CPU slot, no other writer on this CPU while we run.
    unsafe {
        let now = bpf_ktime_get_ns();
        if *last != 0 && now.wrapping_sub(*last) < LOG_INTERVAL_NS {
            return false;
        }
        *last = now;
    }
    true
}

#[classifier]
pub fn netns_uplink_egress(ctx: TcContext) -> i32 {
    verdict(&ctx, nat::uplink_egress(&ctx))
}

#[classifier]
pub fn netns_uplink_ingress(ctx: TcContext) -> i32 {
    verdict(&ctx, nat::uplink_ingress(&ctx))
}

#[classifier]
pub fn netns_port_ingress(ctx: TcContext) -> i32 {
    verdict(&ctx, nat::port_ingress(&ctx))
}

#[cgroup_sock_addr(connect4)]
pub fn netns_connect4(ctx: SockAddrContext) -> i32 {
    sock::redirect_to_container(&ctx)
}

#[cgroup_sock_addr(sendmsg4)]
pub fn netns_sendmsg4(ctx: SockAddrContext) -> i32 {
    sock::redirect_to_container(&ctx)
}

#[cgroup_sock_addr(recvmsg4)]
pub fn netns_recvmsg4(ctx: SockAddrContext) -> i32 {
    sock::restore_host_addr(&ctx)
}

#[cgroup_sock_addr(getpeername4)]
pub fn netns_getpeername4(ctx: SockAddrContext) -> i32 {
    sock::restore_host_addr(&ctx)
}

#[cgroup_sock_addr(bind4)]
pub fn netns_bind4(ctx: SockAddrContext) -> i32 {
    sock::check_bind(&ctx)
}

#[cgroup_sock_addr(connect6)]
pub fn netns_connect6(ctx: SockAddrContext) -> i32 {
    sock::redirect_to_container6(&ctx)
}

#[cgroup_sock_addr(sendmsg6)]
pub fn netns_sendmsg6(ctx: SockAddrContext) -> i32 {
    sock::redirect_to_container6(&ctx)
}

#[cgroup_sock_addr(recvmsg6)]
pub fn netns_recvmsg6(ctx: SockAddrContext) -> i32 {
    sock::restore_host_addr6(&ctx)
}

#[cgroup_sock_addr(getpeername6)]
pub fn netns_getpeername6(ctx: SockAddrContext) -> i32 {
    sock::restore_host_addr6(&ctx)
}

#[cgroup_sock_addr(bind6)]
pub fn netns_bind6(ctx: SockAddrContext) -> i32 {
    sock::check_bind6(&ctx)
}

/// Every drop is counted with its reason; everything else goes on to the next TCX
/// program (TCX_NEXT, not TCX_PASS: other eBPF programs on the same hook still see
/// it) and then down the stack. Drops that signal a problem of netns itself (not of
/// the traffic) are also logged, rate-limited (`netns load --follow` prints them).
#[inline(always)]
fn verdict(ctx: &TcContext, v: Verdict) -> i32 {
    match v {
        Verdict::Pass => TC_ACT_UNSPEC,
        Verdict::Drop(reason) => {
            stats::inc(reason);
            if matches!(
                reason,
                Stat::DropPortExhausted
                    | Stat::DropCtInsert
                    | Stat::DropCsumHelper
                    | Stat::DropFragStash
            ) {
                if log_allowed() {
                    warn!(ctx, "netns drop: {}", reason.name());
                } else {
                    stats::inc(Stat::LogSuppressed);
                }
            }
            TC_ACT_SHOT
        }
        // SAFETY: plain helper call; returns TC_ACT_REDIRECT or TC_ACT_SHOT.
        Verdict::Redirect(ifindex) => unsafe { bpf_redirect(ifindex, 0) as i32 },
        // SAFETY: plain helper calls; each returns TC_ACT_REDIRECT or TC_ACT_SHOT.
        Verdict::RedirectPeer(ifindex) => unsafe { bpf_redirect_peer(ifindex, 0) as i32 },
        Verdict::RedirectNeigh(ifindex) => unsafe {
            bpf_redirect_neigh(ifindex, core::ptr::null_mut(), 0, 0) as i32
        },
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
