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
    Config, IPPROTO_TCP, IPPROTO_UDP, In6, LOOPBACK_IFINDEX, PortTarget, Sock6Key, Sock6Orig,
    SockKey, SockOrig, Stat,
};

use crate::{
    maps::{SOCK_REVNAT, SOCK_REVNAT6, config},
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

/// `user_ip6` of the context, a word at a time (the verifier allows 4-byte accesses).
#[inline(always)]
fn user_ip6(ctx: &SockAddrContext) -> In6 {
    // SAFETY: user_ip6 is readable for the IPv6 sock_addr attach types.
    unsafe {
        let s = sa(ctx);
        In6([
            (*s).user_ip6[0],
            (*s).user_ip6[1],
            (*s).user_ip6[2],
            (*s).user_ip6[3],
        ])
    }
}

#[inline(always)]
fn set_user_ip6(ctx: &SockAddrContext, a: &In6) {
    // SAFETY: user_ip6 is writable for connect6/sendmsg6/recvmsg6/getpeername6.
    unsafe {
        let s = sa(ctx);
        (*s).user_ip6[0] = a.0[0];
        (*s).user_ip6[1] = a.0[1];
        (*s).user_ip6[2] = a.0[2];
        (*s).user_ip6[3] = a.0[3];
    }
}

/// `::1`.
#[inline(always)]
fn is_loopback6(a: &In6) -> bool {
    a.0[0] == 0 && a.0[1] == 0 && a.0[2] == 0 && a.0[3] == 1u32.to_be()
}

/// The IPv4 address of an IPv4-mapped IPv6 one (`::ffff:a.b.c.d`: a dual-stack
/// socket reaching an IPv4 address), network order.
#[inline(always)]
fn v4_mapped(a: &In6) -> Option<u32> {
    (a.0[0] == 0 && a.0[1] == 0 && a.0[2] == 0xffffu32.to_be()).then_some(a.0[3])
}

/// [`lookup`] for IPv6 destinations: mappings on `[::1]` are reachable through it
/// only; wildcard ones through `[::1]` and the uplink's and the gateway's IPv6
/// addresses. Writes the container end to `to`.
#[inline(always)]
fn lookup6(cfg: &Config, a: &In6, port: u16, proto: u8, to: &mut In6) -> Option<u16> {
    if let Some(v4) = v4_mapped(a) {
        let t = lookup(cfg, v4, port, proto)?;
        *to = In6([0, 0, 0xffffu32.to_be(), t.addr]);
        return Some(t.port);
    }
    let t = portfwd::lookup6(a, port, proto)?;
    let ok = match t.ifindex {
        0 => is_loopback6(a) || (*a == cfg.uplink_addr6 && !a.is_zero()) || *a == cfg.gateway6,
        LOOPBACK_IFINDEX => is_loopback6(a),
        _ => true,
    };
    if !ok || cfg.subnet6_mask.is_zero() {
        return None;
    }
    *to = t.addr;
    Some(t.port)
}

#[inline(always)]
fn sock6_key(ctx: &SockAddrContext, addr: In6, port: u16, proto: u8) -> Sock6Key {
    // SAFETY: the context pointer is what the kernel handed us.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.sock_addr.cast()) };
    Sock6Key {
        cookie,
        addr,
        port,
        proto,
        _pad: [0; 5],
    }
}

/// connect6/sendmsg6: [`redirect_to_container`] for IPv6 sockets.
pub fn redirect_to_container6(ctx: &SockAddrContext) -> i32 {
    let Some(cfg) = managed(ctx) else {
        return ALLOW;
    };
    let Some(proto) = proto(ctx) else {
        return ALLOW;
    };
    let addr = user_ip6(ctx);
    // SAFETY: user_port is readable and writable for connect6/sendmsg6.
    let port = unsafe { (*sa(ctx)).user_port } as u16;
    let mut to = In6::ZERO;
    let Some(to_port) = lookup6(cfg, &addr, port, proto, &mut to) else {
        return ALLOW;
    };
    let key = sock6_key(ctx, to, to_port, proto);
    let orig = Sock6Orig {
        addr,
        port,
        _pad: [0; 2],
    };
    let _ = SOCK_REVNAT6.insert(&key, &orig, BPF_ANY as u64);
    set_user_ip6(ctx, &to);
    // SAFETY: as above.
    unsafe { (*sa(ctx)).user_port = to_port as u32 };
    stats::inc(Stat::SockRedirects);
    ALLOW
}

/// recvmsg6/getpeername6: [`restore_host_addr`] for IPv6 sockets.
pub fn restore_host_addr6(ctx: &SockAddrContext) -> i32 {
    if managed(ctx).is_none() {
        return ALLOW;
    }
    let Some(proto) = proto(ctx) else {
        return ALLOW;
    };
    // SAFETY: user_port is readable and writable for recvmsg6/getpeername6.
    let port = unsafe { (*sa(ctx)).user_port } as u16;
    let key = sock6_key(ctx, user_ip6(ctx), port, proto);
    // SAFETY: a valid map value, copied out.
    if let Some(orig) = unsafe { SOCK_REVNAT6.get(&key) }.copied() {
        set_user_ip6(ctx, &orig.addr);
        // SAFETY: as above.
        unsafe { (*sa(ctx)).user_port = orig.port as u32 };
    }
    ALLOW
}

/// bind6: [`check_bind`] for IPv6 sockets. `[::]` (a dual-stack socket takes the
/// IPv4 port too) and `::ffff:a.b.c.d` binds are checked against IPv4 mappings too.
pub fn check_bind6(ctx: &SockAddrContext) -> i32 {
    if managed(ctx).is_none() {
        return ALLOW;
    }
    let Some(proto) = proto(ctx) else {
        return ALLOW;
    };
    let addr = user_ip6(ctx);
    // SAFETY: user_port is readable for bind6.
    let port = unsafe { (*sa(ctx)).user_port } as u16;
    if port == 0 {
        return ALLOW;
    }
    let flags = match v4_mapped(&addr) {
        Some(v4) => portfwd::lookup(v4, port, proto).map(|t| t.flags),
        None => portfwd::lookup6(&addr, port, proto)
            .map(|t| t.flags)
            .or_else(|| {
                if addr.is_zero() {
                    portfwd::lookup(0, port, proto).map(|t| t.flags)
                } else {
                    None
                }
            }),
    };
    match flags {
        Some(f) if f & netns_common::port_flags::RUNTIME_BINDS == 0 => {
            stats::inc(Stat::SockBindDenied);
            DENY
        }
        _ => ALLOW,
    }
}
