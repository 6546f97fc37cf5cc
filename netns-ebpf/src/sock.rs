//! Socket-level port forwarding for processes of the host namespace itself. Their
//! packets to 127.0.0.1 or to a host address never cross a TC hook, so connect4 and
//! sendmsg4 rewrite the destination to the container before routing, and recvmsg4 and
//! getpeername4 show the process the address it asked for. bind4 keeps mapped host
//! ports reserved. Every hook first checks the netns cookie: sockets of any other
//! namespace on the machine are left alone.

use aya_ebpf::{bindings::BPF_ANY, helpers::bpf_get_netns_cookie, programs::SockAddrContext};
use netns_common::{Config, IPPROTO_TCP, IPPROTO_UDP, PortKey, PortTarget, SockKey, Stat};

use crate::{
    maps::{PORTS, SOCK_REVNAT, config},
    stats,
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

/// The port forward a host process's destination hits, if any: loopback matches
/// wildcard mappings and ones bound to 127.0.0.1; a host address matches wildcard
/// mappings and ones bound to that address.
#[inline(always)]
fn lookup(cfg: &Config, addr: u32, port: u16, proto: u8) -> Option<PortTarget> {
    let local = is_loopback(addr) || addr == cfg.uplink_addr || addr == cfg.gateway;
    if !local {
        return None;
    }
    let mut k = PortKey {
        host_addr: addr,
        host_port: port,
        proto,
        _pad: 0,
    };
    if let Some(t) = unsafe { PORTS.get(&k) } {
        return Some(*t);
    }
    k.host_addr = 0;
    unsafe { PORTS.get(&k) }.copied()
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
        let key = SockKey {
            addr: t.addr,
            port: t.port,
            proto,
            _pad: 0,
        };
        let orig = PortTarget {
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
        let key = SockKey {
            addr: (*sa(ctx)).user_ip4,
            port: (*sa(ctx)).user_port as u16,
            proto,
            _pad: 0,
        };
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
    let mut k = PortKey {
        host_addr: addr,
        host_port: port,
        proto,
        _pad: 0,
    };
    let mut taken = unsafe { PORTS.get(&k) }.is_some();
    if !taken {
        // A wildcard mapping reserves the port on every address. (A wildcard bind next
        // to a mapping on one address is allowed: it still gets the other addresses.)
        k.host_addr = 0;
        taken = unsafe { PORTS.get(&k) }.is_some();
    }
    if taken {
        stats::inc(Stat::SockBindDenied);
        return DENY;
    }
    ALLOW
}
