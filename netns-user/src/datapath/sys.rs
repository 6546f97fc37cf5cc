//! What aya 0.14 does not expose, by hand:
//! - which device or cgroup a pinned link is attached to (aya's `LinkInfo` hides the
//!   union of `struct bpf_link_info`);
//! - BPF_LINK_UPDATE of a cgroup link (aya has `attach_to_link` for TCX and XDP links
//!   only, and no conversion of an `FdLink` into a cgroup link);
//! - BPF_LINK_DETACH (aya detaches only links it attached itself);
//! - SO_NETNS_COOKIE (no nix socket option for it: defined here with nix's macro);
//! - BPF_MAP_LOOKUP_BATCH and BPF_MAP_DELETE_BATCH (aya has no batch API).

use std::ffi::CString;
use std::mem::MaybeUninit;
use std::os::fd::{AsFd as _, AsRawFd as _, FromRawFd as _, OwnedFd};
use std::os::unix::ffi::OsStrExt as _;
use std::path::Path;

use aya::maps::{HashMap, IterableMap as _, MapData};
use nix::sys::socket::{self, AddressFamily, SockFlag, SockType};
use nix::{getsockopt_impl, sockopt_impl};

const BPF_OBJ_GET: libc::c_long = 7;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
const BPF_MAP_DELETE_BATCH: libc::c_long = 27;
const BPF_LINK_UPDATE: libc::c_long = 29;
const BPF_LINK_DETACH: libc::c_long = 34;

/// bpf(2) with an attribute struct that outlives the call.
fn bpf<T>(cmd: libc::c_long, attr: &T) -> std::io::Result<libc::c_long> {
    // SAFETY: `attr` is a valid bpf_attr prefix for `cmd` (each caller's repr(C)
    // struct) and lives until the call returns.
    let r = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr as *const T, size_of::<T>()) };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(r)
}

/// bpf(2) with an attribute struct the kernel writes back into (the batch calls
/// return their count there, also on error).
fn bpf_mut<T>(cmd: libc::c_long, attr: &mut T) -> std::io::Result<libc::c_long> {
    // SAFETY: `attr` is a valid, writable bpf_attr prefix for `cmd` that lives until
    // the call returns; the kernel writes only inside it.
    let r = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr as *mut T, size_of::<T>()) };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(r)
}

#[repr(C)]
struct ObjGetAttr {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
}

fn obj_get(path: &Path) -> std::io::Result<OwnedFd> {
    let c = CString::new(path.as_os_str().as_bytes())?;
    let attr = ObjGetAttr {
        pathname: c.as_ptr() as u64,
        bpf_fd: 0,
        file_flags: 0,
    };
    let fd = bpf(BPF_OBJ_GET, &attr)?;
    // SAFETY: the kernel returned a new file descriptor that we now own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

#[repr(C)]
struct InfoByFdAttr {
    bpf_fd: u32,
    info_len: u32,
    info: u64,
}

/// `struct bpf_link_info` starts with type, id, prog_id, then the union: the tcx
/// member starts with the ifindex at byte 16, the cgroup member with the cgroup id.
/// A link whose device or cgroup is gone (or that was detached) reads 0 there.
pub struct LinkInfo {
    pub prog_id: u32,
    pub ifindex: u32,
    pub cgroup_id: u64,
}

pub fn link_info(pin: &Path) -> std::io::Result<LinkInfo> {
    let fd = obj_get(pin)?;
    let mut info = [0u32; 32];
    let attr = InfoByFdAttr {
        bpf_fd: fd.as_raw_fd() as u32,
        info_len: size_of_val(&info) as u32,
        info: info.as_mut_ptr() as u64,
    };
    bpf(BPF_OBJ_GET_INFO_BY_FD, &attr)?;
    Ok(LinkInfo {
        prog_id: info[2],
        ifindex: info[4],
        cgroup_id: u64::from(info[4]) | (u64::from(info[5]) << 32),
    })
}

#[repr(C)]
struct LinkUpdateAttr {
    link_fd: u32,
    new_prog_fd: u32,
    flags: u32,
    old_prog_fd: u32,
}

/// BPF_LINK_UPDATE: atomically swaps the program behind a pinned (cgroup) link, with
/// no moment where no program is attached.
pub fn link_update(link_pin: &Path, prog_pin: &Path) -> std::io::Result<()> {
    let link = obj_get(link_pin)?;
    let prog = obj_get(prog_pin)?;
    let attr = LinkUpdateAttr {
        link_fd: link.as_raw_fd() as u32,
        new_prog_fd: prog.as_raw_fd() as u32,
        flags: 0,
        old_prog_fd: 0,
    };
    bpf(BPF_LINK_UPDATE, &attr).map(drop)
}

/// BPF_LINK_DETACH (Linux >= 5.9; TCX and cgroup links support it): detaches a
/// pinned link from its hook even while some process still holds a descriptor of it.
pub fn link_detach(link_pin: &Path) -> std::io::Result<()> {
    let link = obj_get(link_pin)?;
    // bpf_attr for BPF_LINK_DETACH is just the link fd.
    let attr: u32 = link.as_raw_fd() as u32;
    bpf(BPF_LINK_DETACH, &attr).map(drop)
}

sockopt_impl!(
    /// SO_NETNS_COOKIE (Linux >= 5.14): the cookie of the socket's network namespace.
    NetnsCookie,
    GetOnly,
    libc::SOL_SOCKET,
    libc::SO_NETNS_COOKIE,
    u64
);

/// The cookie of the current network namespace: the socket hooks compare it with
/// `bpf_get_netns_cookie` to act only here.
pub fn netns_cookie() -> std::io::Result<u64> {
    let sock = socket::socket(
        AddressFamily::Inet,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    Ok(socket::getsockopt(&sock, NetnsCookie)?)
}

/// Four random bytes from the kernel (getrandom(2)).
pub fn random_u32() -> std::io::Result<u32> {
    let mut b = [0u8; 4];
    // SAFETY: getrandom writes at most b.len() bytes into b.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
    if n != b.len() as isize {
        return Err(std::io::Error::last_os_error());
    }
    Ok(u32::from_ne_bytes(b))
}

/// `struct bpf_attr`'s `batch` member (BPF_MAP_*_BATCH).
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// Entries asked for per BPF_MAP_LOOKUP_BATCH call (grown if one bucket holds more).
const LOOKUP_BATCH: usize = 4096;

/// Every entry of a hash or LRU hash map, read with BPF_MAP_LOOKUP_BATCH: a bucket at a
/// time, the cursor being the bucket index. So the walk is one pass over the buckets,
/// bounded by the map's size, whatever is inserted, deleted or evicted meanwhile (a
/// GET_NEXT_KEY walk starts over from the first key when the current one goes, and
/// under churn may never end); an entry added behind the cursor is not seen, one
/// deleted ahead of it is not returned. The typed map guarantees that `K` and `V` are
/// the map's key and value sizes.
pub fn lookup_batch<K: aya::Pod, V: aya::Pod>(
    m: &HashMap<MapData, K, V>,
) -> std::io::Result<Vec<(K, V)>> {
    let fd = m.map().fd().as_fd().as_raw_fd() as u32;
    let mut chunk = LOOKUP_BATCH;
    let mut keys: Vec<MaybeUninit<K>> = Vec::new();
    let mut values: Vec<MaybeUninit<V>> = Vec::new();
    // The kernel's cursor for hash maps is a u32 bucket index; room for more is given.
    let (mut cursor, mut next) = (0u64, 0u64);
    let mut first = true;
    let mut out = Vec::new();
    loop {
        keys.resize_with(chunk, MaybeUninit::uninit);
        values.resize_with(chunk, MaybeUninit::uninit);
        let mut attr = BatchAttr {
            in_batch: if first { 0 } else { &raw const cursor as u64 },
            out_batch: &raw mut next as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: chunk as u32,
            map_fd: fd,
            ..BatchAttr::default()
        };
        let r = bpf_mut(BPF_MAP_LOOKUP_BATCH, &mut attr);
        let done = match r {
            Ok(_) => false,
            // Past the last bucket: the entries of this call are the last ones.
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => true,
            // One bucket holds more entries than asked for: ask for more.
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) && attr.count == 0 => {
                chunk *= 2;
                continue;
            }
            Err(e) => return Err(e),
        };
        let n = (attr.count as usize).min(chunk);
        for i in 0..n {
            // SAFETY: the kernel wrote the first `n` keys and values; `K` and `V` are
            // Pod, valid for any bytes.
            out.push(unsafe { (keys[i].assume_init(), values[i].assume_init()) });
        }
        if done {
            return Ok(out);
        }
        if n == 0 {
            // The kernel returns success only with entries: never loop on nothing.
            return Err(std::io::Error::other(
                "BPF_MAP_LOOKUP_BATCH returned no entries and no end",
            ));
        }
        cursor = next;
        first = false;
    }
}

/// Deletes `keys` from a hash map with BPF_MAP_DELETE_BATCH; keys that are not there
/// are skipped (the kernel stops at the first one, with ENOENT: the call resumes after
/// it). Returns how many entries were deleted.
pub fn delete_batch<K: aya::Pod, V: aya::Pod>(
    m: &mut HashMap<MapData, K, V>,
    keys: &[K],
) -> std::io::Result<usize> {
    let fd = m.map().fd().as_fd().as_raw_fd() as u32;
    let (mut at, mut deleted) = (0, 0);
    while at < keys.len() {
        let rest = &keys[at..];
        let n = rest.len().min(u32::MAX as usize);
        let mut attr = BatchAttr {
            keys: rest.as_ptr() as u64,
            count: n as u32,
            map_fd: fd,
            ..BatchAttr::default()
        };
        let r = bpf_mut(BPF_MAP_DELETE_BATCH, &mut attr);
        let c = (attr.count as usize).min(n);
        deleted += c;
        at += c;
        match r {
            Ok(_) if c == 0 => break,
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => at += 1,
            Err(e) => return Err(e),
        }
    }
    Ok(deleted)
}
