//! The one port-forward lookup: a mapping on the exact address first, then the
//! wildcard. Where a mapping may be reached from is the caller's rule (`PortTarget::
//! ifindex` says which interface an exact mapping's address belongs to).

use netns_common::{In6, Port6Key, Port6Target, PortKey, PortTarget};

use crate::maps::{PORTS, PORTS6};

#[inline(always)]
pub fn lookup(addr: u32, port: u16, proto: u8) -> Option<PortTarget> {
    let mut k = PortKey {
        host_addr: addr,
        host_port: port,
        proto,
        _pad: 0,
    };
    // SAFETY: map values are plain data; the copy is taken at once.
    if let Some(t) = unsafe { PORTS.get(&k) } {
        return Some(*t);
    }
    k.host_addr = 0;
    unsafe { PORTS.get(&k) }.copied()
}

/// Is a mapping with target interface `ifindex` reachable by a packet arriving on
/// interface `arrived`, addressed to the arriving interface's main address
/// (`to_main`)? Wildcard mappings answer on the main address only.
#[inline(always)]
pub fn reachable_on(t: &PortTarget, arrived: u32, to_main: bool) -> bool {
    if t.ifindex == 0 {
        to_main
    } else {
        t.ifindex == arrived
    }
}

/// [`lookup`] for IPv6: the exact address first, then the wildcard (zero).
#[inline(always)]
pub fn lookup6(addr: &In6, port: u16, proto: u8) -> Option<Port6Target> {
    let mut k = Port6Key {
        host_addr: *addr,
        host_port: port,
        proto,
        _pad: 0,
    };
    // SAFETY: map values are plain data; the copy is taken at once.
    if let Some(t) = unsafe { PORTS6.get(&k) } {
        return Some(*t);
    }
    k.host_addr = In6::ZERO;
    unsafe { PORTS6.get(&k) }.copied()
}
