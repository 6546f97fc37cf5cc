//! Per-CPU counters and the verdict type that forces every drop to carry a reason.

use netns_common::Stat;

use crate::maps::STATS;

pub enum Verdict {
    Pass,
    Drop(Stat),
    /// Sent straight to a bridge port's egress (hairpin), bypassing the host stack.
    Redirect(u32),
    /// Into the network namespace of the container behind this host veth.
    RedirectPeer(u32),
    /// Out of this interface, the kernel resolving the next hop's MAC.
    RedirectNeigh(u32),
}

#[inline(always)]
pub fn inc(stat: Stat) {
    if let Some(p) = STATS.get_ptr_mut(stat as u32) {
        // SAFETY: per-CPU slot, no other writer on this CPU while we run.
        unsafe { *p += 1 };
    }
}
