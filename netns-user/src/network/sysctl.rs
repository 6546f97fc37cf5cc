//! Per-namespace sysctls. Files under /proc/sys/net belong to the network namespace of
//! the process that opens them, so this acts on the hook's own namespace.

use std::path::{Path, PathBuf};

use super::portset::PortSet;

pub const IP_FORWARD: &str = "/proc/sys/net/ipv4/ip_forward";

#[derive(Debug, thiserror::Error)]
#[error("{what} {}", path.display())]
pub struct SysctlError {
    what: &'static str,
    path: PathBuf,
    #[source]
    source: std::io::Error,
}

/// Turns on IPv4 forwarding; Ok(true) if it was off. The classic hook never did this,
/// so its containers could not reach beyond the bridge (runc issue 1856).
pub fn enable_ip_forward() -> Result<bool, SysctlError> {
    ensure_one(Path::new(IP_FORWARD))
}

pub const IP6_FORWARD: &str = "/proc/sys/net/ipv6/conf/all/forwarding";

/// What turning on IPv6 forwarding changed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Ip6Forward {
    /// Forwarding was off.
    pub enabled: bool,
    /// The uplink's `accept_ra` went from 1 to 2: with forwarding on, the kernel
    /// ignores router advertisements on interfaces at 1, and the host would lose its
    /// SLAAC address and default route on the uplink.
    pub kept_ra_on: Option<String>,
}

/// Turns on IPv6 forwarding (for `--ip6`), keeping the uplink's router
/// advertisements accepted first.
pub fn enable_ip6_forward(uplink: &str) -> Result<Ip6Forward, SysctlError> {
    enable_ip6_forward_in(Path::new(NET_ROOT), uplink)
}

fn enable_ip6_forward_in(net: &Path, uplink: &str) -> Result<Ip6Forward, SysctlError> {
    let mut out = Ip6Forward::default();
    let fwd = net.join("ipv6/conf/all/forwarding");
    let ra = net.join("ipv6/conf").join(uplink).join("accept_ra");
    let on = read_sysctl(&fwd)
        .map(|v| v.trim() == "1")
        .map_err(|source| SysctlError {
            what: "reading",
            path: fwd.clone(),
            source,
        })?;
    if on {
        return Ok(out);
    }
    if read_sysctl(&ra).is_ok_and(|v| v.trim() == "1") {
        ensure_value(&ra, "2")?;
        out.kept_ra_on = Some(uplink.to_owned());
    }
    out.enabled = ensure_one(&fwd)?;
    Ok(out)
}

pub const RESERVED_PORTS: &str = "/proc/sys/net/ipv4/ip_local_reserved_ports";

/// Adds `min-max` to an ip_local_reserved_ports file (keeping what is there) so the
/// host never picks a masquerade port as an ephemeral port. Ok(true) if it changed
/// anything. Callers go through [`crate::reserve::nat_range`], which keeps the record
/// of mapped ports consistent.
pub(crate) fn reserve_in(path: &Path, min: u16, max: u16) -> Result<bool, SysctlError> {
    let err = |what| {
        let path = path.to_owned();
        move |source| SysctlError { what, path, source }
    };
    let cur = read_sysctl(path).map_err(err("reading"))?;
    let covered = cur.trim().split(',').filter(|r| !r.is_empty()).any(|r| {
        let (a, b) = r.split_once('-').unwrap_or((r, r));
        matches!((a.trim().parse::<u16>(), b.trim().parse::<u16>()), (Ok(a), Ok(b)) if a <= min && max <= b)
    });
    if covered {
        return Ok(false);
    }
    let new = if cur.trim().is_empty() {
        format!("{min}-{max}\n")
    } else {
        format!("{},{min}-{max}\n", cur.trim())
    };
    std::fs::write(path, new).map_err(err("writing"))?;
    Ok(true)
}

/// Room for the longest ip_local_reserved_ports text (every other port: ~190 KB).
const READ_MAX: usize = 256 * 1024;

/// A sysctl's text in ONE read(2): the kernel formats it into the first read's buffer
/// and returns EOF to any read at a non-zero offset, so `read_to_string` (whose first
/// read of a size-0 file is a 32-byte probe) would silently truncate a long list.
fn read_sysctl(path: &Path) -> std::io::Result<String> {
    use std::io::Read as _;
    let mut f = std::fs::File::open(path)?;
    let mut buf = vec![0u8; READ_MAX];
    let n = f.read(&mut buf)?;
    if n == buf.len() {
        return Err(std::io::Error::other("longer than expected"));
    }
    buf.truncate(n);
    String::from_utf8(buf).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
}

/// The port set in a file of the ip_local_reserved_ports format.
pub fn read_port_set(path: &Path) -> Result<PortSet, SysctlError> {
    let err = |what| {
        let path = path.to_owned();
        move |source| SysctlError { what, path, source }
    };
    let cur = read_sysctl(path).map_err(err("reading"))?;
    cur.parse()
        .map_err(|e| err("parsing")(std::io::Error::new(std::io::ErrorKind::InvalidData, e)))
}

/// Replaces the whole set. The kernel reads at most a page per write(2) and ORs each
/// continuation into the set, so one `write_all` of a long list is one update.
pub fn write_port_set(path: &Path, set: &PortSet) -> Result<(), SysctlError> {
    std::fs::write(path, format!("{set}\n")).map_err(|source| SysctlError {
        what: "writing",
        path: path.to_owned(),
        source,
    })
}

/// Per-interface sysctls of the bridge: nothing a container sends may configure the
/// host. An RA would give the bridge an address and a default route via the
/// container; a redirect would reroute the host's traffic through it.
const BRIDGE_IPV6: [&str; 3] = ["accept_ra", "autoconf", "accept_redirects"];
const BRIDGE_IPV4: [&str; 2] = ["accept_redirects", "secure_redirects"];

/// Sets the bridge's sysctls to 0 ([`BRIDGE_IPV6`] is skipped when IPv6 is disabled:
/// its directory is absent). Returns the files it changed.
pub fn harden_bridge(bridge: &str) -> Result<Vec<PathBuf>, SysctlError> {
    harden_bridge_in(Path::new(NET_ROOT), bridge)
}

pub const NET_ROOT: &str = "/proc/sys/net";

fn harden_bridge_in(net: &Path, bridge: &str) -> Result<Vec<PathBuf>, SysctlError> {
    let mut changed = Vec::new();
    let v6 = net.join("ipv6/conf").join(bridge);
    let v4 = net.join("ipv4/conf").join(bridge);
    let v6_files = if v6.is_dir() { &BRIDGE_IPV6[..] } else { &[] };
    let files = v6_files
        .iter()
        .map(|f| v6.join(f))
        .chain(BRIDGE_IPV4.iter().map(|f| v4.join(f)));
    for f in files {
        if ensure_value(&f, "0")? {
            changed.push(f);
        }
    }
    Ok(changed)
}

fn ensure_one(path: &Path) -> Result<bool, SysctlError> {
    ensure_value(path, "1")
}

/// Writes `value` unless the file already holds it; Ok(true) if it wrote.
fn ensure_value(path: &Path, value: &'static str) -> Result<bool, SysctlError> {
    let err = |what| {
        let path = path.to_owned();
        move |source| SysctlError { what, path, source }
    };
    let cur = read_sysctl(path).map_err(err("reading"))?;
    if cur.trim() == value {
        return Ok(false);
    }
    std::fs::write(path, format!("{value}\n")).map_err(err("writing"))?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reserves_port_ranges_once() {
        let tmp = tempfile::tempdir().unwrap();
        let f = tmp.path().join("reserved");
        std::fs::write(&f, "\n").unwrap();
        assert!(reserve_in(&f, 61000, 65535).unwrap());
        assert_eq!(std::fs::read_to_string(&f).unwrap(), "61000-65535\n");
        assert!(!reserve_in(&f, 61000, 65535).unwrap());
        std::fs::write(&f, "22,8000-9000\n").unwrap();
        assert!(!reserve_in(&f, 8100, 8200).unwrap());
        assert!(reserve_in(&f, 61000, 61010).unwrap());
        assert_eq!(
            std::fs::read_to_string(&f).unwrap(),
            "22,8000-9000,61000-61010\n"
        );
    }

    #[test]
    fn writes_only_when_needed() {
        let tmp = tempfile::tempdir().unwrap();
        let f = tmp.path().join("ip_forward");
        std::fs::write(&f, "0\n").unwrap();
        assert!(ensure_one(&f).unwrap());
        assert_eq!(std::fs::read_to_string(&f).unwrap(), "1\n");
        assert!(!ensure_one(&f).unwrap());
        let e = ensure_one(&tmp.path().join("missing")).unwrap_err();
        assert!(e.to_string().contains("missing"), "{e}");
    }

    #[test]
    fn ip6_forwarding_keeps_the_uplinks_router_adverts() {
        let d = tempfile::tempdir().unwrap();
        let net = d.path();
        std::fs::create_dir_all(net.join("ipv6/conf/all")).unwrap();
        std::fs::create_dir_all(net.join("ipv6/conf/up0")).unwrap();
        std::fs::write(net.join("ipv6/conf/all/forwarding"), "0\n").unwrap();
        std::fs::write(net.join("ipv6/conf/up0/accept_ra"), "1\n").unwrap();
        let r = enable_ip6_forward_in(net, "up0").unwrap();
        assert!(r.enabled);
        assert_eq!(r.kept_ra_on.as_deref(), Some("up0"));
        let read = |f: &str| std::fs::read_to_string(net.join(f)).unwrap();
        assert_eq!(read("ipv6/conf/all/forwarding").trim(), "1");
        assert_eq!(read("ipv6/conf/up0/accept_ra").trim(), "2");
        // Already on: nothing touched (an admin's accept_ra stays).
        std::fs::write(net.join("ipv6/conf/up0/accept_ra"), "1\n").unwrap();
        assert_eq!(
            enable_ip6_forward_in(net, "up0").unwrap(),
            Ip6Forward::default()
        );
        assert_eq!(read("ipv6/conf/up0/accept_ra").trim(), "1");
    }

    #[test]
    fn hardens_bridge_sysctls() {
        let tmp = tempfile::tempdir().unwrap();
        let net = tmp.path();
        let v4 = net.join("ipv4/conf/br0");
        std::fs::create_dir_all(&v4).unwrap();
        std::fs::write(v4.join("accept_redirects"), "1\n").unwrap();
        std::fs::write(v4.join("secure_redirects"), "0\n").unwrap();
        // IPv6 disabled: no ipv6/conf/br0, skipped.
        assert_eq!(
            harden_bridge_in(net, "br0").unwrap(),
            [v4.join("accept_redirects")]
        );
        let v6 = net.join("ipv6/conf/br0");
        std::fs::create_dir_all(&v6).unwrap();
        for f in BRIDGE_IPV6 {
            std::fs::write(v6.join(f), "1\n").unwrap();
        }
        assert_eq!(harden_bridge_in(net, "br0").unwrap().len(), 3);
        for f in BRIDGE_IPV6 {
            assert_eq!(std::fs::read_to_string(v6.join(f)).unwrap(), "0\n");
        }
        assert!(harden_bridge_in(net, "br0").unwrap().is_empty());
        // A missing file names itself.
        std::fs::remove_file(v4.join("secure_redirects")).unwrap();
        let e = harden_bridge_in(net, "br0").unwrap_err().to_string();
        assert!(e.contains("ipv4/conf/br0/secure_redirects"), "{e}");
    }

    #[test]
    fn port_set_files() {
        let tmp = tempfile::tempdir().unwrap();
        let f = tmp.path().join("reserved");
        std::fs::write(&f, "22,8000-8002\n").unwrap();
        let mut s = read_port_set(&f).unwrap();
        s.insert(8003);
        write_port_set(&f, &s).unwrap();
        assert_eq!(std::fs::read_to_string(&f).unwrap(), "22,8000-8003\n");
        std::fs::write(&f, "junk\n").unwrap();
        let e = read_port_set(&f).unwrap_err().to_string();
        assert!(e.starts_with("parsing ") && e.contains("reserved"), "{e}");
    }
}
