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
