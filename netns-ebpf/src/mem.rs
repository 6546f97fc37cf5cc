//! Zeroing and small copies without `memset`/`memmove`: LLVM's BPF backend turns a
//! zero initialisation or a copy between a map value and the packet into a call to a
//! byte-at-a-time loop (64 bytes: ~320 instructions on every packet); volatile word
//! accesses stay a handful of loads and stores.

use core::mem::{MaybeUninit, align_of, size_of};

/// A `T` with every byte zero. `T` must be valid all-zero, 4-aligned (BPF stack
/// accesses must be aligned) and a multiple of 4 bytes.
#[inline(always)]
pub fn zeroed<T>() -> T {
    let mut v = MaybeUninit::<T>::uninit();
    zero_in_place(v.as_mut_ptr());
    // SAFETY: every byte written; all-zero is a valid `T` (the caller's promise).
    unsafe { v.assume_init() }
}

/// Zeroes the `T` at `p` in place (as [`zeroed`], for values too large to move: a
/// move is a copy LLVM may make a `memset` again).
#[inline(always)]
pub fn zero_in_place<T>(p: *mut T) {
    const { assert!(size_of::<T>() % 4 == 0 && align_of::<T>() >= 4) };
    let p = p.cast::<u32>();
    let mut i = 0;
    while i < size_of::<T>() / 4 {
        // SAFETY: in bounds of the caller's `T`, 4-aligned.
        unsafe { core::ptr::write_volatile(p.add(i), 0) };
        i += 1;
    }
}

/// Copies a MAC address (6 bytes, 2-aligned at both ends: map values and the
/// Ethernet header) as three 16-bit words.
#[inline(always)]
pub fn copy_mac(dst: *mut [u8; 6], src: &[u8; 6]) {
    let (d, s) = (dst.cast::<u16>(), (src as *const [u8; 6]).cast::<u16>());
    // SAFETY: three words inside both 6-byte objects.
    unsafe {
        for i in 0..3 {
            core::ptr::write_volatile(d.add(i), core::ptr::read_volatile(s.add(i)));
        }
    }
}
