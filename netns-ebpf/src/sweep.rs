//! In-kernel sweeps of the conntrack tables (`bpf_for_each_map_elem`): run only when
//! a container reaches its budget (recount its pairs) or the copies table is full
//! (drop copies of pairs that are gone), at most once a second each, so no process
//! has to walk the tables. Halves of containers that are gone are removed on the way
//! (expired ones are left to lazy expiry: judging a pair needs its partner, and the
//! callback's stack is the scarcest).

use core::ffi::c_void;

use aya_ebpf::helpers::{bpf_for_each_map_elem, bpf_ktime_get_ns, bpf_map_delete_elem};
use netns_common::{CtEntry, CtKeep, CtKey, ct_flags};

use crate::{
    conntrack,
    maps::{CONNTRACK, CT_KEEP, CT_NEW, SWEEP_COUNT, SWEEP_LAST, config},
};

const NS: u64 = 1_000_000_000;

#[repr(C)]
struct Owner {
    addr: u32,
    generation: u32,
    now: u64,
}

/// One half met by a sweep: removed when its container is gone (its partner is too,
/// when the walk gets there); counted when it is a live forward half of the owner.
/// Kept small: this frame sits on top of the deepest call chain (pair creation).
extern "C" fn count_cb(
    map: *mut c_void,
    key: *mut CtKey,
    val: *mut CtEntry,
    ctx: *mut Owner,
) -> i64 {
    // SAFETY: the kernel passes a valid key, value and our context.
    let (v, o) = unsafe { (&*val, &*ctx) };
    if conntrack::stale(v) {
        // SAFETY: deleting from the map being walked (allowed for hash maps).
        if unsafe { bpf_map_delete_elem(map, key.cast()) } == 0 {
            crate::stats::inc(netns_common::Stat::CtStale);
        }
        return 0;
    }
    if v.flags & ct_flags::FWD != 0 && v.owner == o.addr && v.generation == o.generation {
        let Some(cfg) = config() else { return 1 };
        // A half idle past its own timeout is not counted (its flow is dead, or alive
        // only the other way: a slight undercount, never a container blocked by
        // dead flows).
        // SAFETY: `key` is valid for the callback's duration.
        if !conntrack::idle_expired(cfg, unsafe { (*key).proto }, v, o.now) {
            if let Some(n) = SWEEP_COUNT.get_ptr_mut(0) {
                // SAFETY: per-CPU slot, no other writer on this CPU while we run.
                unsafe { *n += 1 };
            }
        }
    }
    0
}

/// Recounts the live pairs of container `addr` (generation `generation`) in both
/// tables, removing dead pairs on the way.
#[inline(always)]
pub fn count_owner(addr: u32, generation: u32, now: u64) -> u32 {
    let Some(n) = SWEEP_COUNT.get_ptr_mut(0) else {
        return 0;
    };
    // SAFETY: per-CPU slot.
    unsafe { *n = 0 };
    let mut o = Owner {
        addr,
        generation,
        now,
    };
    // SAFETY: helper calls over our maps with a static callback and a stack context.
    unsafe {
        // Unreplied first: a pair promoted meanwhile (inserted in the main table, then
        // removed here) is counted twice rather than missed.
        bpf_for_each_map_elem(
            (&CT_NEW as *const _) as *mut c_void,
            count_cb as *mut c_void,
            (&mut o as *mut Owner).cast(),
            0,
        );
        bpf_for_each_map_elem(
            (&CONNTRACK as *const _) as *mut c_void,
            count_cb as *mut c_void,
            (&mut o as *mut Owner).cast(),
            0,
        );
    }
    crate::stats::inc(netns_common::Stat::CtSweeps);
    // SAFETY: per-CPU slot.
    unsafe { *n }
}

/// A copy whose half and partner are both gone from the main table is garbage.
extern "C" fn keep_cb(map: *mut c_void, key: *mut CtKey, val: *mut CtKeep, _ctx: *mut u64) -> i64 {
    // SAFETY: the kernel passes a valid key and value.
    let (k, c) = unsafe { (&*key, &*val) };
    let pk = CtKey::new(c.xlat.reversed(), k.proto, netns_common::partner_dir(k.dir));
    let gone = CONNTRACK.get_ptr(k).is_none() && CONNTRACK.get_ptr(&pk).is_none();
    if gone {
        // SAFETY: deleting from the map being walked.
        unsafe { bpf_map_delete_elem(map, (k as *const CtKey).cast()) };
    }
    0
}

/// The copies table is full: drop copies of pairs that are gone (at most once a
/// second).
#[inline(always)]
pub fn request() {
    let Some(last) = SWEEP_LAST.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: plain helper call; a racy write of the slot only lets one more sweep run.
    unsafe {
        let now = bpf_ktime_get_ns();
        if now.saturating_sub(*last) < NS {
            return;
        }
        *last = now;
        let mut unused = 0u64;
        bpf_for_each_map_elem(
            (&CT_KEEP as *const _) as *mut c_void,
            keep_cb as *mut c_void,
            (&mut unused as *mut u64).cast(),
            0,
        );
    }
    crate::stats::inc(netns_common::Stat::CtSweeps);
}
