//! Socket-level port forwarding for processes of the host namespace itself. Their
//! packets to 127.0.0.1 or to a host address never cross a TC hook, so connect4 and
//! sendmsg4 rewrite the destination to the container before routing, and recvmsg4 and
//! getpeername4 show the process the address it asked for. bind4 keeps mapped host
//! ports reserved. Every hook first checks the netns cookie: sockets of any other
//! namespace on the machine are left alone.

use aya_ebpf::{
    bindings::BPF_ANY,
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie},
    programs::SockAddrContext,
};
use netns_common::{
    Config, IPPROTO_TCP, IPPROTO_UDP, LOOPBACK_IFINDEX, PortTarget, SockKey, SockOrig, Stat,
};

use crate::{
    maps::{SOCK_REVNAT, config},
    portfwd, stats,
};

/// The context pointer, re-read for every field access: the verifier rejects a store
/// through a ctx pointer LLVM has pre-offset and kept in a register ("dereference of
/// modified ctx ptr"), and a volatile reload makes each access `base + const`.
#[inline(always)]
fn sa(ctx: &SockAddrContext) -> *mut aya_ebpf::bindings::bpf_sock_addr {
    // SAFETY: reading a pointer-sized field of a live reference.
    unsafe { core::ptr::read_volatile(&ctx.sock_addr) }
}

const ALLOW: i32 = 1;
const DENY: i32 = 0;

#[inline(always)]
fn managed(ctx: &SockAddrContext) -> Option<&'static Config> {
    let cfg = config()?;
    // SAFETY: the context pointer is what the kernel handed us.
    let cookie = unsafe { bpf_get_netns_cookie(ctx.sock_addr.cast()) };
    (cfg.netns_cookie != 0 && cookie == cfg.netns_cookie).then_some(cfg)
}

#[inline(always)]
fn proto(ctx: &SockAddrContext) -> Option<u8> {
    // SAFETY: reading context fields the verifier allows for this attach type.
    let p = unsafe { (*sa(ctx)).protocol } as u8;
    (p == IPPROTO_TCP || p == IPPROTO_UDP).then_some(p)
}

#[inline(always)]
fn is_loopback(addr_be: u32) -> bool {
    u32::from_be(addr_be) >> 24 == 127
}

/// The port forward a host process's destination hits, if any: a mapping on exactly
/// that address (a loopback-only one only through loopback), or a wildcard one
/// through loopback or the uplink's or gateway's address.
#[inline(always)]
fn lookup(cfg: &Config, addr: u32, port: u16, proto: u8) -> Option<PortTarget> {
    let t = portfwd::lookup(addr, port, proto)?;
    let ok = match t.ifindex {
        0 => is_loopback(addr) || addr == cfg.uplink_addr || addr == cfg.gateway,
        LOOPBACK_IFINDEX => is_loopback(addr),
        _ => true,
    };
    ok.then_some(t)
}

/// Key of a socket's translation: the socket itself and the container end, so that
/// two sockets reaching one container port through two host addresses each get theirs.
#[inline(always)]
fn sock_key(ctx: &SockAddrContext, addr: u32, port: u16, proto: u8) -> SockKey {
    // SAFETY: the context pointer is what the kernel handed us.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.sock_addr.cast()) };
    SockKey {
        cookie,
        addr,
        port,
        proto,
        _pad: 0,
    }
}

pub fn redirect_to_container(ctx: &SockAddrContext) -> i32 {
    let Some(cfg) = managed(ctx) else {
        return ALLOW;
    };
    let Some(proto) = proto(ctx) else {
        return ALLOW;
    };
    // SAFETY: user_ip4/user_port are readable and writable for connect4/sendmsg4.
    unsafe {
        let addr = (*sa(ctx)).user_ip4;
        let port = (*sa(ctx)).user_port as u16;
        let Some(t) = lookup(cfg, addr, port, proto) else {
            return ALLOW;
        };
        let key = sock_key(ctx, t.addr, t.port, proto);
        let orig = SockOrig {
            addr,
            port,
            _pad: [0; 2],
        };
        let _ = SOCK_REVNAT.insert(&key, &orig, BPF_ANY as u64);
        (*sa(ctx)).user_ip4 = t.addr;
        (*sa(ctx)).user_port = t.port as u32;
    }
    stats::inc(Stat::SockRedirects);
    ALLOW
}

pub fn restore_host_addr(ctx: &SockAddrContext) -> i32 {
    if managed(ctx).is_none() {
        return ALLOW;
    }
    let Some(proto) = proto(ctx) else {
        return ALLOW;
    };
    // SAFETY: user_ip4/user_port are readable and writable for recvmsg4/getpeername4.
    unsafe {
        let key = sock_key(ctx, (*sa(ctx)).user_ip4, (*sa(ctx)).user_port as u16, proto);
        if let Some(orig) = SOCK_REVNAT.get(&key) {
            (*sa(ctx)).user_ip4 = orig.addr;
            (*sa(ctx)).user_port = orig.port as u32;
        }
    }
    ALLOW
}

/// A mapped host port belongs to its container: refuse host processes binding it (the
/// way docker holds the port with a bound socket, without a process to keep alive).
pub fn check_bind(ctx: &SockAddrContext) -> i32 {
    let Some(_cfg) = managed(ctx) else {
        return ALLOW;
    };
    let Some(proto) = proto(ctx) else {
        return ALLOW;
    };
    // SAFETY: user_ip4/user_port are readable for bind4.
    let (addr, port) = unsafe { ((*sa(ctx)).user_ip4, (*sa(ctx)).user_port as u16) };
    if port == 0 {
        return ALLOW;
    }
    // A wildcard mapping reserves the port on every address. (A wildcard bind next to
    // a mapping on one address is allowed: it still gets the other addresses.)
    if let Some(t) = portfwd::lookup(addr, port, proto) {
        if t.flags & netns_common::port_flags::RUNTIME_BINDS != 0 {
            return ALLOW;
        }
        stats::inc(Stat::SockBindDenied);
        return DENY;
    }
    ALLOW
}
