//! Effective-capability check, so a command without the privileges it needs refuses
//! up front with a clear message instead of failing half-way (a bridge made, no veth).
//!
//! Reads `CapEff` from `/proc/self/status`; no library needed.

use std::fmt;

/// The capabilities netns needs (bit numbers from `linux/capability.h`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cap {
    /// Links, addresses, routes, TC attachment, net sysctls.
    NetAdmin = 12,
    /// `setns()` into a container's namespace; also implies BPF on every kernel.
    SysAdmin = 21,
    /// bpf(): loading programs, opening pinned maps (kernel >= 5.8).
    Bpf = 39,
}

impl Cap {
    pub fn name(self) -> &'static str {
        match self {
            Cap::NetAdmin => "CAP_NET_ADMIN",
            Cap::SysAdmin => "CAP_SYS_ADMIN",
            Cap::Bpf => "CAP_BPF",
        }
    }

    fn bit(self) -> u64 {
        1 << (self as u32)
    }
}

impl fmt::Display for Cap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What a command needs: every group must be satisfied by at least one of its caps.
#[derive(Debug, Clone, Copy)]
pub struct Need(pub &'static [&'static [Cap]]);

impl Need {
    /// Datapath and network access: CAP_NET_ADMIN, and CAP_BPF or CAP_SYS_ADMIN.
    pub const DATAPATH: Need = Need(&[&[Cap::NetAdmin], &[Cap::Bpf, Cap::SysAdmin]]);
    /// Prestart also enters the container's namespace: CAP_NET_ADMIN and CAP_SYS_ADMIN.
    pub const PRESTART: Need = Need(&[&[Cap::NetAdmin], &[Cap::SysAdmin]]);

    /// The groups `eff` satisfies none of, as "CAP_A" or "CAP_A or CAP_B".
    pub fn missing(self, eff: u64) -> Vec<String> {
        self.0
            .iter()
            .filter(|g| !g.iter().any(|c| eff & c.bit() != 0))
            .map(|g| g.iter().map(|c| c.name()).collect::<Vec<_>>().join(" or "))
            .collect()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CapError {
    #[error(
        "{what} needs {missing} in its effective capabilities (CapEff {eff:#x}); \
         run it as root with full capabilities (as runc runs hooks)"
    )]
    Missing {
        what: String,
        missing: String,
        eff: u64,
    },
    #[error("reading the effective capabilities from /proc/self/status")]
    Read(#[source] std::io::Error),
    #[error("no parsable CapEff line in /proc/self/status")]
    Parse,
}

/// The `CapEff` mask of a `/proc/<pid>/status` text.
pub fn parse_cap_eff(status: &str) -> Option<u64> {
    status.lines().find_map(|l| {
        let v = l.strip_prefix("CapEff:")?;
        u64::from_str_radix(v.trim(), 16).ok()
    })
}

/// This process's effective capabilities.
pub fn effective() -> Result<u64, CapError> {
    let s = std::fs::read_to_string("/proc/self/status").map_err(CapError::Read)?;
    parse_cap_eff(&s).ok_or(CapError::Parse)
}

/// Refuses unless the effective set satisfies `need`; `what` names the command.
pub fn require(what: &str, need: Need) -> Result<(), CapError> {
    let eff = effective()?;
    check(what, need, eff)
}

fn check(what: &str, need: Need, eff: u64) -> Result<(), CapError> {
    let missing = need.missing(eff);
    if missing.is_empty() {
        return Ok(());
    }
    Err(CapError::Missing {
        what: what.to_owned(),
        missing: if missing.len() > 1 {
            missing
                .iter()
                .map(|m| {
                    if m.contains(" or ") {
                        format!("({m})")
                    } else {
                        m.clone()
                    }
                })
                .collect::<Vec<_>>()
                .join(" and ")
        } else {
            missing.join("")
        },
        eff,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_cap_eff() {
        let status = "Name:\tnetns\nCapInh:\t0000000000000000\nCapPrm:\t000001ffffffffff\n\
                      CapEff:\t000001ffffffffff\nCapBnd:\t000001ffffffffff\n";
        assert_eq!(parse_cap_eff(status), Some(0x1ff_ffff_ffff));
        assert_eq!(parse_cap_eff("CapEff:\t0000000000000000\n"), Some(0));
        assert_eq!(parse_cap_eff("CapEff:\tzz\n"), None);
        assert_eq!(parse_cap_eff("Name:\tx\n"), None);
        // The real file parses.
        assert!(effective().is_ok());
    }

    #[test]
    fn requirements() {
        let net = Cap::NetAdmin.bit();
        let bpf = Cap::Bpf.bit();
        let sys = Cap::SysAdmin.bit();
        assert!(check("x", Need::DATAPATH, net | bpf).is_ok());
        assert!(check("x", Need::DATAPATH, net | sys).is_ok());
        assert!(check("x", Need::DATAPATH, 0x1ff_ffff_ffff).is_ok());
        let e = check("netns stats", Need::DATAPATH, bpf).unwrap_err();
        assert_eq!(
            Need::DATAPATH.missing(bpf),
            vec!["CAP_NET_ADMIN".to_owned()]
        );
        assert!(
            e.to_string().starts_with("netns stats needs CAP_NET_ADMIN"),
            "{e}"
        );
        assert_eq!(
            Need::DATAPATH.missing(0),
            vec!["CAP_NET_ADMIN", "CAP_BPF or CAP_SYS_ADMIN"]
        );
        let e = check("netns gc", Need::DATAPATH, 0).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("netns gc needs CAP_NET_ADMIN and (CAP_BPF or CAP_SYS_ADMIN) in"),
            "{e}"
        );
        assert!(check("x", Need::PRESTART, net | bpf).is_err());
        assert!(check("x", Need::PRESTART, net | sys).is_ok());
    }
}
