//! Links: the TCX programs on the uplink and on every bridge port, the socket programs
//! on a cgroup; attaching, detaching, and `netns datapath check`'s repair.

use std::fs::{self, File};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use aya::programs::links::FdLink;
use aya::programs::{
    CgroupAttachMode, CgroupSockAddr, CgroupSockAddrAttachType, SchedClassifier, TcAttachType,
};
use netns_common::progs;
use serde::Serialize;

use super::pins::Pins;
use super::status::Attach;
use super::{Datapath, DatapathConfig, DatapathError, io, link_err, pin_err, prog_err, sys};

/// The uplink's programs: (program, attach point, link pin name).
const UPLINK_LINKS: [(&str, TcAttachType, &str); 2] = [
    (
        progs::UPLINK_EGRESS,
        TcAttachType::Egress,
        Pins::UPLINK_EGRESS_LINK,
    ),
    (
        progs::UPLINK_INGRESS,
        TcAttachType::Ingress,
        Pins::UPLINK_INGRESS_LINK,
    ),
];

/// The socket programs and their cgroup attach types.
const SOCK_LINKS: [(&str, CgroupSockAddrAttachType); 10] = [
    (progs::SOCK_CONNECT4, CgroupSockAddrAttachType::Connect4),
    (progs::SOCK_SENDMSG4, CgroupSockAddrAttachType::UDPSendMsg4),
    (progs::SOCK_RECVMSG4, CgroupSockAddrAttachType::UDPRecvMsg4),
    (
        progs::SOCK_GETPEERNAME4,
        CgroupSockAddrAttachType::GetPeerName4,
    ),
    (progs::SOCK_BIND4, CgroupSockAddrAttachType::Bind4),
    (progs::SOCK_CONNECT6, CgroupSockAddrAttachType::Connect6),
    (progs::SOCK_SENDMSG6, CgroupSockAddrAttachType::UDPSendMsg6),
    (progs::SOCK_RECVMSG6, CgroupSockAddrAttachType::UDPRecvMsg6),
    (
        progs::SOCK_GETPEERNAME6,
        CgroupSockAddrAttachType::GetPeerName6,
    ),
    (progs::SOCK_BIND6, CgroupSockAddrAttachType::Bind6),
];

/// What `netns datapath check` did: every attachment it found missing, re-attached or not.
#[derive(Debug, Default, Serialize)]
pub struct CheckReport {
    /// Re-attached (`<program> on <where>`).
    pub repaired: Vec<String>,
    pub failed: Vec<CheckFailure>,
}

#[derive(Debug, Serialize)]
pub struct CheckFailure {
    pub what: String,
    pub error: String,
}

impl CheckReport {
    fn record(&mut self, what: String, r: Result<(), DatapathError>) {
        match r {
            Ok(()) => self.repaired.push(what),
            Err(e) => self.failed.push(CheckFailure {
                what,
                error: crate::error_chain(&e),
            }),
        }
    }
}

/// A pinned link as its pin name says: which program, attached where.
#[derive(Debug, Clone)]
pub(super) struct PinnedLink {
    pub pin: PathBuf,
    pub program: &'static str,
    pub attach: Attach,
}

/// Every pinned link, sorted by pin name.
pub(super) fn pinned_links(pins: &Pins) -> Result<Vec<PinnedLink>, DatapathError> {
    let dir = pins.links_dir();
    let rd = match fs::read_dir(&dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io(format!("reading {}", dir.display()))(e)),
    };
    let mut paths: Vec<PathBuf> = rd.filter_map(Result::ok).map(|e| e.path()).collect();
    paths.sort();
    Ok(paths
        .into_iter()
        .filter_map(|pin| {
            let file = pin.file_name()?.to_str()?.to_owned();
            let (program, attach) = link_kind(&file)?;
            Some(PinnedLink {
                pin,
                program,
                attach,
            })
        })
        .collect())
}

/// Program and attach point of a link pin name; None for names netns never writes.
fn link_kind(file: &str) -> Option<(&'static str, Attach)> {
    if let Some(p) = file.strip_prefix("cgroup-") {
        let (name, _) = SOCK_LINKS.iter().find(|(n, _)| *n == p)?;
        return Some((name, Attach::Cgroup));
    }
    match file {
        Pins::UPLINK_EGRESS_LINK => Some((progs::UPLINK_EGRESS, Attach::TcxEgress)),
        Pins::UPLINK_INGRESS_LINK => Some((progs::UPLINK_INGRESS, Attach::TcxIngress)),
        f if port_link_ifindex(f).is_some() => Some((progs::PORT_INGRESS, Attach::TcxIngress)),
        _ => None,
    }
}

/// The ifindex of a `port-<ifindex>` pin name.
fn port_link_ifindex(file: &str) -> Option<u32> {
    file.strip_prefix("port-")?.parse().ok()
}

/// The ifindex a pinned TCX link is attached to; None if there is no pin or the link's
/// device is gone (or it was detached).
pub(super) fn link_ifindex(pin: &Path) -> Option<u32> {
    let info = sys::link_info(pin).ok()?;
    (info.ifindex != 0).then_some(info.ifindex)
}

/// The name of an interface of this namespace.
pub(super) fn ifname(ifindex: u32) -> Result<String, DatapathError> {
    // nix 0.31 does not see if_indextoname's NULL return (it checks for -1) and hands
    // back an empty name instead: that is ENXIO too.
    nix::net::if_::if_indextoname(ifindex)
        .map_err(std::io::Error::from)
        .and_then(|c| match c.to_string_lossy().into_owned() {
            n if n.is_empty() => Err(std::io::Error::from_raw_os_error(libc::ENXIO)),
            n => Ok(n),
        })
        .map_err(io(format!("no interface with ifindex {ifindex}")))
}

/// Attaches a pinned program to `ifindex` with a TCX link and pins the link at
/// `link_pin` (replacing a stale pin there).
fn attach_tcx(
    prog_pin: &Path,
    ifindex: u32,
    attach: TcAttachType,
    link_pin: &Path,
) -> Result<(), DatapathError> {
    let _ = fs::remove_file(link_pin);
    let name = ifname(ifindex)?;
    let mut prog = SchedClassifier::from_pin(prog_pin)
        .map_err(prog_err(format!("opening {}", prog_pin.display())))?;
    let id = prog.attach(&name, attach).map_err(prog_err(format!(
        "attaching {} to {name}",
        prog_pin.display()
    )))?;
    let link = prog
        .take_link(id)
        .map_err(prog_err("taking the TCX link"))?;
    let fd: FdLink = link
        .try_into()
        .map_err(link_err("TCX link expected (kernel >= 6.6)"))?;
    fd.pin(link_pin)
        .map_err(pin_err(format!("pinning {}", link_pin.display())))?;
    Ok(())
}

impl Datapath {
    /// Attaches the uplink programs unless their pinned links already point at the
    /// configured uplink. A stale link (uplink renamed or recreated) is replaced.
    pub(super) fn ensure_uplink(&self, cfg: &DatapathConfig) -> Result<(), DatapathError> {
        for (prog, attach, link) in UPLINK_LINKS {
            let pin = self.pins.link(link);
            if let Some(ifindex) = link_ifindex(&pin) {
                if ifindex == cfg.uplink_ifindex {
                    continue;
                }
                log::info!(
                    "uplink changed (ifindex {ifindex} -> {}): re-attaching {prog}",
                    cfg.uplink_ifindex
                );
            }
            attach_tcx(&self.pins.prog(prog), cfg.uplink_ifindex, attach, &pin)?;
        }
        Ok(())
    }

    /// Attaches the socket programs (host processes reaching port forwards through
    /// loopback or a host address; bind reservation of mapped ports) to a cgroup v2
    /// directory, once: links are pinned as `links/cgroup-<program>`. The programs
    /// act only on sockets of the network namespace netns manages (netns cookie check),
    /// so attaching at the cgroup root does not affect other namespaces.
    pub fn attach_cgroup(&self, cgroup: &Path) -> Result<(), DatapathError> {
        for (name, ty) in SOCK_LINKS {
            if !self.pins.link(&format!("cgroup-{name}")).exists() {
                self.attach_sock(cgroup, name, ty)?;
            }
        }
        Ok(())
    }

    fn attach_sock(
        &self,
        cgroup: &Path,
        name: &str,
        ty: CgroupSockAddrAttachType,
    ) -> Result<(), DatapathError> {
        let dir = File::open(cgroup).map_err(io(format!("opening cgroup {}", cgroup.display())))?;
        let link_pin = self.pins.link(&format!("cgroup-{name}"));
        let _ = fs::remove_file(&link_pin);
        let pin = self.pins.prog(name);
        let mut prog = CgroupSockAddr::from_pin(&pin, ty)
            .map_err(prog_err(format!("opening {}", pin.display())))?;
        let id = prog
            // bpf_link_create takes no flags for cgroups: links always coexist.
            .attach(&dir, CgroupAttachMode::Single)
            .map_err(prog_err(format!(
                "attaching {name} to cgroup {}",
                cgroup.display()
            )))?;
        let link = prog
            .take_link(id)
            .map_err(prog_err("taking the cgroup link"))?;
        let fd: FdLink = link
            .try_into()
            .map_err(link_err("bpf_link expected (kernel >= 5.7)"))?;
        fd.pin(&link_pin)
            .map_err(pin_err(format!("pinning {}", link_pin.display())))?;
        Ok(())
    }

    /// Attaches the bridge-port program to a container's host veth (TC ingress) and pins
    /// the link as `links/port-<ifindex>`.
    pub fn attach_port(&mut self, host_ifindex: u32) -> Result<(), DatapathError> {
        // A pin left by an earlier veth that had the same ifindex is stale: replaced.
        attach_tcx(
            &self.pins.prog(progs::PORT_INGRESS),
            host_ifindex,
            TcAttachType::Ingress,
            &self.pins.port_link(host_ifindex),
        )
    }

    /// Is the port program attached to `host_ifindex` through its pinned link?
    pub fn port_attached(&self, host_ifindex: u32) -> bool {
        link_ifindex(&self.pins.port_link(host_ifindex)) == Some(host_ifindex)
    }

    /// Removes the pinned link of a bridge port (no error if absent).
    pub fn detach_port(&mut self, host_ifindex: u32) -> Result<(), DatapathError> {
        let pin = self.pins.port_link(host_ifindex);
        match fs::remove_file(&pin) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io(format!("removing {}", pin.display()))(e)),
        }
    }

    /// The ifindexes with a pinned `port-<ifindex>` link, ascending.
    pub fn port_links(&self) -> Result<Vec<u32>, DatapathError> {
        let mut out: Vec<u32> = pinned_links(&self.pins)?
            .iter()
            .filter_map(|l| port_link_ifindex(l.pin.file_name()?.to_str()?))
            .collect();
        out.sort_unstable();
        Ok(out)
    }

    /// Verifies every attachment and re-attaches what is missing or detached: the
    /// uplink programs, each registered container's bridge port, and the cgroup
    /// programs (if `cgroup` is given). Refreshes the config map first. A re-attach
    /// that fails is reported in [`CheckReport::failed`], not as repaired.
    pub fn check(
        &self,
        cfg: &DatapathConfig,
        cgroup: Option<&Path>,
    ) -> Result<CheckReport, DatapathError> {
        self.write_config(cfg)?;
        let mut report = CheckReport::default();
        for (prog, attach, link) in UPLINK_LINKS {
            let pin = self.pins.link(link);
            if link_ifindex(&pin) != Some(cfg.uplink_ifindex) {
                report.record(
                    format!("{prog} on uplink ifindex {}", cfg.uplink_ifindex),
                    attach_tcx(&self.pins.prog(prog), cfg.uplink_ifindex, attach, &pin),
                );
            }
        }
        let eps: Vec<(Ipv4Addr, _)> = self.endpoints()?.list()?;
        for (ip, ep) in eps {
            if !self.port_attached(ep.ifindex) {
                report.record(
                    format!(
                        "{} on bridge port ifindex {} ({ip})",
                        progs::PORT_INGRESS,
                        ep.ifindex
                    ),
                    attach_tcx(
                        &self.pins.prog(progs::PORT_INGRESS),
                        ep.ifindex,
                        TcAttachType::Ingress,
                        &self.pins.port_link(ep.ifindex),
                    ),
                );
            }
        }
        if let Some(cg) = cgroup {
            for (name, ty) in SOCK_LINKS {
                let pin = self.pins.link(&format!("cgroup-{name}"));
                if !sys::link_info(&pin).is_ok_and(|i| i.cgroup_id != 0) {
                    report.record(
                        format!("{name} on cgroup {}", cg.display()),
                        self.attach_sock(cg, name, ty),
                    );
                }
            }
        }
        Ok(report)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_pin_names() {
        assert_eq!(
            link_kind("uplink-egress"),
            Some((progs::UPLINK_EGRESS, Attach::TcxEgress))
        );
        assert_eq!(
            link_kind("port-17"),
            Some((progs::PORT_INGRESS, Attach::TcxIngress))
        );
        assert_eq!(
            link_kind("cgroup-netns_bind4"),
            Some((progs::SOCK_BIND4, Attach::Cgroup))
        );
        for other in ["port-x", "cgroup-nope", "stray"] {
            assert_eq!(link_kind(other), None, "{other}");
        }
        assert_eq!(port_link_ifindex("port-42"), Some(42));
    }
}
