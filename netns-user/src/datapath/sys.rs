//! What aya 0.14 does not expose, by hand:
//! - which device or cgroup a pinned link is attached to (aya's `LinkInfo` hides the
//!   union of `struct bpf_link_info`);
//! - BPF_LINK_UPDATE of a cgroup link (aya has `attach_to_link` for TCX and XDP links
//!   only, and no conversion of an `FdLink` into a cgroup link);
//! - BPF_LINK_DETACH (aya detaches only links it attached itself);
//! - SO_NETNS_COOKIE (no nix socket option for it: defined here with nix's macro).

use std::ffi::CString;
use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};
use std::os::unix::ffi::OsStrExt as _;
use std::path::Path;

use nix::sys::socket::{self, AddressFamily, SockFlag, SockType};
use nix::{getsockopt_impl, sockopt_impl};

const BPF_OBJ_GET: libc::c_long = 7;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
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
