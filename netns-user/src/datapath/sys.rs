//! The raw bpf(2) calls aya does not expose: reading which device a pinned TCX link is
//! attached to (aya's `LinkInfo` hides the union), updating and detaching a pinned link.

use std::ffi::CString;
use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};
use std::os::unix::ffi::OsStrExt as _;
use std::path::Path;

const BPF_OBJ_GET: libc::c_long = 7;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;

#[repr(C)]
struct ObjGetAttr {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
}

#[repr(C)]
struct InfoByFdAttr {
    bpf_fd: u32,
    info_len: u32,
    info: u64,
}

fn obj_get(path: &Path) -> std::io::Result<OwnedFd> {
    let c = CString::new(path.as_os_str().as_bytes())?;
    let attr = ObjGetAttr {
        pathname: c.as_ptr() as u64,
        bpf_fd: 0,
        file_flags: 0,
    };
    // SAFETY: attr is a valid bpf_attr prefix for BPF_OBJ_GET and outlives the call.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_GET,
            &attr as *const ObjGetAttr,
            size_of::<ObjGetAttr>(),
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the kernel returned a new file descriptor that we now own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// `struct bpf_link_info` starts with type, id, prog_id, then the union: the tcx
/// member starts with the ifindex at byte 16, the cgroup member with the cgroup id.
/// A link whose device or cgroup is gone (or that was detached) reads 0 there.
pub struct LinkInfo {
    pub ifindex: u32,
    pub cgroup_id: u64,
}

pub fn link_info(pin: &Path) -> std::io::Result<LinkInfo> {
    let mut info = [0u32; 32];
    info_by_pin(pin, &mut info)?;
    Ok(LinkInfo {
        ifindex: info[4],
        cgroup_id: u64::from(info[4]) | (u64::from(info[5]) << 32),
    })
}

/// BPF_OBJ_GET_INFO_BY_FD on a pinned object into `info`.
fn info_by_pin(pin: &Path, info: &mut [u32]) -> std::io::Result<()> {
    let fd = obj_get(pin)?;
    let attr = InfoByFdAttr {
        bpf_fd: fd.as_raw_fd() as u32,
        info_len: size_of_val(info) as u32,
        info: info.as_mut_ptr() as u64,
    };
    // SAFETY: attr points at a buffer of info_len bytes that outlives the call.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_GET_INFO_BY_FD,
            &attr as *const InfoByFdAttr,
            size_of::<InfoByFdAttr>(),
        )
    };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[repr(C)]
struct LinkUpdateAttr {
    link_fd: u32,
    new_prog_fd: u32,
    flags: u32,
    old_prog_fd: u32,
}

/// BPF_LINK_UPDATE: atomically swaps the program behind a pinned link (TCX or cgroup),
/// with no moment where no program is attached.
pub fn link_update(link_pin: &Path, prog_pin: &Path) -> std::io::Result<()> {
    const BPF_LINK_UPDATE: libc::c_long = 29;
    let link = obj_get(link_pin)?;
    let prog = obj_get(prog_pin)?;
    let attr = LinkUpdateAttr {
        link_fd: link.as_raw_fd() as u32,
        new_prog_fd: prog.as_raw_fd() as u32,
        flags: 0,
        old_prog_fd: 0,
    };
    // SAFETY: attr is a valid bpf_attr prefix for BPF_LINK_UPDATE and outlives the call.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_LINK_UPDATE,
            &attr as *const LinkUpdateAttr,
            size_of::<LinkUpdateAttr>(),
        )
    };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// BPF_LINK_DETACH (Linux >= 5.9; TCX and cgroup links support it): detaches a
/// pinned link from its hook even while some process still holds a descriptor of it.
pub fn link_detach(link_pin: &Path) -> std::io::Result<()> {
    const BPF_LINK_DETACH: libc::c_long = 34;
    let link = obj_get(link_pin)?;
    let attr: u32 = link.as_raw_fd() as u32;
    // SAFETY: bpf_attr for BPF_LINK_DETACH is just the link fd; attr outlives the call.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_LINK_DETACH,
            &attr as *const u32,
            size_of::<u32>(),
        )
    };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// The MAC address of an interface of the current network namespace.
pub fn if_mac(name: &str) -> std::io::Result<[u8; 6]> {
    let sock = socket()?;
    // SAFETY: ifreq is plain data; zeroed is a valid initial value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    let bytes = name.as_bytes();
    if bytes.len() >= req.ifr_name.len() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "interface name too long",
        ));
    }
    for (d, s) in req.ifr_name.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    // SAFETY: SIOCGIFHWADDR fills ifr_hwaddr of a valid ifreq.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFHWADDR, &mut req) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the ioctl succeeded, so the union holds ifr_hwaddr.
    let sa = unsafe { req.ifr_ifru.ifru_hwaddr };
    let mut mac = [0u8; 6];
    for (d, s) in mac.iter_mut().zip(sa.sa_data.iter()) {
        *d = *s as u8;
    }
    Ok(mac)
}

/// The cookie of the current network namespace (SO_NETNS_COOKIE, Linux >= 5.14): the
/// socket hooks compare it with `bpf_get_netns_cookie` to act only here.
pub fn netns_cookie() -> std::io::Result<u64> {
    const SO_NETNS_COOKIE: libc::c_int = 71;
    let sock = socket()?;
    let mut cookie: u64 = 0;
    let mut len = size_of::<u64>() as libc::socklen_t;
    // SAFETY: cookie/len describe a valid u64 buffer.
    let r = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&raw mut cookie).cast(),
            &mut len,
        )
    };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(cookie)
}

fn socket() -> std::io::Result<OwnedFd> {
    // SAFETY: plain socket(2) call.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// The id of a pinned program (`struct bpf_prog_info` starts with type, id).
pub fn prog_id(pin: &Path) -> std::io::Result<u32> {
    let mut info = [0u32; 64];
    info_by_pin(pin, &mut info)?;
    Ok(info[1])
}
