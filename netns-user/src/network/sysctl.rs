//! Per-namespace sysctls. Files under /proc/sys/net belong to the network namespace of
//! the process that opens them, so this acts on the hook's own namespace.

use std::path::{Path, PathBuf};

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

pub const RESERVED_PORTS: &str = "/proc/sys/net/ipv4/ip_local_reserved_ports";

/// Adds `min-max` to ip_local_reserved_ports (keeping what is there) so the host never
/// picks a masquerade port as an ephemeral port. Ok(true) if it changed anything.
pub fn reserve_ports(min: u16, max: u16) -> Result<bool, SysctlError> {
    reserve_in(Path::new(RESERVED_PORTS), min, max)
}

fn reserve_in(path: &Path, min: u16, max: u16) -> Result<bool, SysctlError> {
    let err = |what| {
        let path = path.to_owned();
        move |source| SysctlError { what, path, source }
    };
    let cur = std::fs::read_to_string(path).map_err(err("reading"))?;
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

fn ensure_one(path: &Path) -> Result<bool, SysctlError> {
    let err = |what| {
        let path = path.to_owned();
        move |source| SysctlError { what, path, source }
    };
    let cur = std::fs::read_to_string(path).map_err(err("reading"))?;
    if cur.trim() == "1" {
        return Ok(false);
    }
    std::fs::write(path, b"1\n").map_err(err("writing 1 to"))?;
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
}
