//! In-kernel sweeps of the conntrack tables (`bpf_for_each_map_elem`): run only when
//! a container reaches its budget (recount its pairs) or the copies table is full
//! (drop copies of pairs that are gone), at most once a second each, so no process
//! has to walk the tables. Expired and stale pairs met on the way are removed.

use core::ffi::c_void;

use aya_ebpf::helpers::{
    bpf_for_each_map_elem, bpf_ktime_get_ns, bpf_map_delete_elem, bpf_map_lookup_elem,
};
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

/// One half met by a sweep: removes it with its partner when the pair is expired or
/// stale; counts it when it is a live forward half of the owner.
extern "C" fn count_cb(
    map: *mut c_void,
    key: *mut CtKey,
    val: *mut CtEntry,
    ctx: *mut Owner,
) -> i64 {
    // SAFETY: the kernel passes a valid key, value and our context.
    let (k, v, o) = unsafe { (&*key, &*val, &*ctx) };
    let Some(cfg) = config() else { return 1 };
    let dead = conntrack::stale(v)
        || conntrack::idle_expired(cfg, k.proto, v, o.now) && {
            let pk = v.partner_key(k);
            // SAFETY: lookup in the map being walked, with a key on our stack.
            let p = unsafe { bpf_map_lookup_elem(map, (&pk as *const CtKey).cast()) };
            let p = if p.is_null() {
                None
            } else {
                // SAFETY: a non-null lookup result is a valid value of this map.
                Some(unsafe { &*(p as *const CtEntry) })
            };
            conntrack::pair_expired(cfg, k.proto, v, p, o.now)
        };
    if dead {
        let pk = v.partner_key(k);
        // SAFETY: deleting from the map being walked (allowed for hash maps).
        unsafe {
            bpf_map_delete_elem(map, (&pk as *const CtKey).cast());
            bpf_map_delete_elem(map, (k as *const CtKey).cast());
        }
        return 0;
    }
    if v.flags & ct_flags::FWD != 0 && v.owner == o.addr && v.generation == o.generation {
        if let Some(n) = SWEEP_COUNT.get_ptr_mut(0) {
            // SAFETY: per-CPU slot, no other writer on this CPU while we run.
            unsafe { *n += 1 };
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
