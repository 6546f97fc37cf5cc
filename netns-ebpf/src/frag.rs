//! IPv4 fragments that arrive before their first fragment. Only the first fragment
//! carries the ports that say which container a datagram is for, so a later fragment
//! that overtook it is held in a map (not dropped, as Cilium and einat-ebpf do) and
//! sent on once the first fragment has been seen: the program turns the current packet
//! into each held frame in turn, clones it back into the uplink's ingress (where the
//! fragment cache now knows its ports), and finally restores the first fragment.

use aya_ebpf::{
    bindings::{BPF_F_INGRESS, BPF_NOEXIST},
    helpers::{bpf_clone_redirect, bpf_skb_change_tail, bpf_skb_load_bytes, bpf_skb_store_bytes},
    programs::TcContext,
};
use netns_common::{FragKey, STASH_FRAME_MAX, STASH_SLOTS, StashKey, StashedFrame, Stat};

use crate::{
    maps::{FRAG_STASH, SCRATCH},
    stats,
};

/// Copies the current frame into the per-CPU scratch frame.
#[inline(always)]
fn capture(ctx: &TcContext) -> Result<*mut StashedFrame, Stat> {
    let len = ctx.len() as usize;
    if len == 0 || len > STASH_FRAME_MAX {
        return Err(Stat::DropFragStash);
    }
    let buf = SCRATCH.get_ptr_mut(0).ok_or(Stat::DropFragStash)?;
    // SAFETY: buf points at a StashedFrame map value; len is bounded by its data size.
    unsafe {
        let n = (len as u32) & 0x7ff;
        if n == 0 || n as usize > STASH_FRAME_MAX {
            return Err(Stat::DropFragStash);
        }
        if bpf_skb_load_bytes(ctx.skb.skb.cast(), 0, (*buf).data.as_mut_ptr().cast(), n) != 0 {
            return Err(Stat::DropFragStash);
        }
        (*buf).len = n;
    }
    Ok(buf)
}

/// Replaces the current frame with `frame`'s bytes.
#[inline(always)]
fn become_frame(ctx: &TcContext, frame: *const StashedFrame) -> Result<(), Stat> {
    // SAFETY: frame points at a map value; the length is bounded before use.
    unsafe {
        let n = (*frame).len & 0x7ff;
        if n < 14 || n as usize > STASH_FRAME_MAX {
            return Err(Stat::DropFragStash);
        }
        if bpf_skb_change_tail(ctx.skb.skb, n, 0) != 0 {
            return Err(Stat::DropFragStash);
        }
        if bpf_skb_store_bytes(ctx.skb.skb, 0, (*frame).data.as_ptr().cast(), n, 0) != 0 {
            return Err(Stat::DropFragStash);
        }
    }
    Ok(())
}

/// Keeps a copy of the current (later) fragment of datagram `key`, in case its first
/// fragment turns out to be a container's. The original goes on to the host.
#[inline(never)]
pub fn stash(ctx: &TcContext, key: &FragKey) -> Result<(), Stat> {
    let frame = capture(ctx)?;
    let mut slot = 0;
    while slot < STASH_SLOTS {
        let k = StashKey { frag: *key, slot };
        // SAFETY: frame is a valid map value pointer.
        if FRAG_STASH
            .insert(&k, unsafe { &*frame }, BPF_NOEXIST as u64)
            .is_ok()
        {
            return Ok(());
        }
        slot += 1;
    }
    Err(Stat::DropFragStash)
}

/// After the first fragment of datagram `key` was translated and its ports cached:
/// sends every held fragment of it back into `ifindex`'s ingress, then restores the
/// current packet.
#[inline(never)]
pub fn replay(ctx: &TcContext, key: &FragKey, ifindex: u32) -> Result<(), Stat> {
    // Cheap check first: nothing held is the common case.
    if unsafe {
        FRAG_STASH.get(&StashKey {
            frag: *key,
            slot: 0,
        })
    }
    .is_none()
    {
        return Ok(());
    }
    let first = capture(ctx)?;
    let mut slot = 0;
    while slot < STASH_SLOTS {
        let k = StashKey { frag: *key, slot };
        if let Some(frame) = FRAG_STASH.get_ptr(&k) {
            become_frame(ctx, frame)?;
            // SAFETY: plain helper call on our own skb.
            if unsafe { bpf_clone_redirect(ctx.skb.skb, ifindex, BPF_F_INGRESS as u64) } == 0 {
                stats::inc(Stat::FragReplayed);
            }
            let _ = FRAG_STASH.remove(&k);
        }
        slot += 1;
    }
    become_frame(ctx, first)
}

/// Forgets held fragments of datagram `key` (it turned out to be the host's own).
#[inline(always)]
pub fn discard(key: &FragKey) {
    let first = StashKey {
        frag: *key,
        slot: 0,
    };
    if unsafe { FRAG_STASH.get(&first) }.is_none() {
        return;
    }
    let mut slot = 0;
    while slot < STASH_SLOTS {
        let _ = FRAG_STASH.remove(&StashKey { frag: *key, slot });
        slot += 1;
    }
}
