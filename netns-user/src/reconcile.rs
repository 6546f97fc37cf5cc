//! Reconciling the state directory with the kernel: whatever a killed hook, a lost
//! poststop or a vanished container left behind is torn down and released.
//!
//! Runs under the state directory's lock, which every prestart holds from start to end,
//! so nothing it sees is a setup in progress: an incomplete lease belongs to a prestart
//! that died (or whose rollback failed).
//!
//! * [`Mode::DeadPids`] (start of every prestart): only leases whose pid no longer is the
//!   container's (cheap /proc checks); nothing is done if every pid is alive.
//! * [`Mode::Full`] (`netns gc`, each collector sweep): also incomplete leases and leases
//!   whose veth is gone; then port forwards of containers without a lease leave the
//!   table, [`apply`] makes the datapath's maps and the port reservation follow the
//!   state directory, and host veths and port links that no lease owns are removed.
//!
//! A container is gone when its pid does not exist, when the pid now belongs to a
//! process with another start time (pid reuse), or when the pid lives in another
//! network namespace than the one recorded at prestart.

use std::collections::HashSet;
use std::fs;
use std::net::Ipv4Addr;
use std::os::unix::fs::MetadataExt as _;
use std::path::Path;

use serde::Serialize;

use crate::apply::{self, ApplyError};
use crate::config::NetConfig;
use crate::datapath::{Datapath, DatapathError};
use crate::ipam::{self, IpamError, Lease};
use crate::network::{Netlink, NetlinkError, veth};
use crate::portmap::{self, Mapping, PortMapError};
use crate::store::{Locked, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error(transparent)]
    Ipam(#[from] IpamError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    PortMap(#[from] PortMapError),
    #[error(transparent)]
    Datapath(#[from] DatapathError),
    #[error(transparent)]
    Netlink(#[from] NetlinkError),
    #[error(transparent)]
    Apply(#[from] ApplyError),
}

/// How much to check.
#[derive(Debug, Clone, Copy)]
pub enum Mode<'a> {
    /// Only leases whose pid is dead or reused; `skip` is the id the caller handles itself.
    DeadPids { skip: Option<&'a str> },
    /// Everything.
    Full,
}

/// A lease torn down and released.
#[derive(Debug, Clone, Serialize)]
pub struct Released {
    pub id: String,
    pub ip: Ipv4Addr,
    pub pid: u32,
    pub host_veth: String,
    pub reason: String,
}

/// What a reconcile did.
#[derive(Debug, Default, Clone, Serialize)]
pub struct Report {
    pub leases_released: Vec<Released>,
    /// Port forwards of containers without a lease (`HOST -> TARGET (id)`).
    pub port_maps_removed: Vec<String>,
    /// What [`apply`] changed in the datapath and the reservation.
    pub applied: Vec<apply::Change>,
    pub veths_deleted: Vec<String>,
    /// Ifindexes whose pinned `port-<ifindex>` link was removed.
    pub port_links_removed: Vec<u32>,
    /// What could not be cleaned (logged; retried next time).
    pub failures: Vec<String>,
}

impl Report {
    pub fn is_empty(&self) -> bool {
        self.lines().is_empty()
    }

    /// One line per action, for `netns gc` and the log.
    pub fn lines(&self) -> Vec<String> {
        let mut out = Vec::new();
        for r in &self.leases_released {
            out.push(format!(
                "released container {} ({}, pid {}, {}): {}",
                r.id, r.ip, r.pid, r.host_veth, r.reason
            ));
        }
        for m in &self.port_maps_removed {
            out.push(format!("removed port forward {m}: container has no lease"));
        }
        out.extend(self.applied.iter().map(ToString::to_string));
        for v in &self.veths_deleted {
            out.push(format!("deleted host veth {v}: no lease"));
        }
        for i in &self.port_links_removed {
            out.push(format!("removed pinned link port-{i}: no lease"));
        }
        for f in &self.failures {
            out.push(format!("FAILED: {f}"));
        }
        out
    }
}

/// Field 22 (`starttime`) of a `/proc/<pid>/stat` text. The command name (field 2) is
/// in parentheses and may itself contain spaces and parentheses, so fields are counted
/// from the last `)`.
pub fn parse_start_time(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    // Fields 3.. follow; starttime is field 22.
    rest.split_whitespace().nth(22 - 3)?.parse().ok()
}

/// Start time of `pid` under `proc` (normally /proc), None if it does not exist.
pub fn pid_start_time_in(proc: &Path, pid: u32) -> Option<u64> {
    parse_start_time(&fs::read_to_string(proc.join(pid.to_string()).join("stat")).ok()?)
}

/// Inode of the network namespace of `pid` under `proc`.
pub fn netns_ino_in(proc: &Path, pid: u32) -> Option<u64> {
    fs::metadata(proc.join(pid.to_string()).join("ns/net"))
        .ok()
        .map(|m| m.ino())
}

/// Why the container of `lease` is gone, from /proc alone; None if its pid still is the
/// process (and namespace) recorded at prestart. Leases written before pid_start and
/// netns_ino were recorded are judged by pid existence only.
pub fn pid_gone(proc: &Path, lease: &Lease) -> Option<String> {
    let pid = lease.pid;
    let Some(start) = pid_start_time_in(proc, pid) else {
        return Some(format!("pid {pid} no longer exists"));
    };
    if let Some(want) = lease.pid_start
        && want != start
    {
        return Some(format!(
            "pid {pid} now belongs to another process (start time {start}, recorded {want})"
        ));
    }
    if let Some(want) = lease.netns_ino {
        match netns_ino_in(proc, pid) {
            Some(ino) if ino == want => {}
            Some(ino) => {
                return Some(format!(
                    "pid {pid} is in another network namespace (inode {ino}, recorded {want})"
                ));
            }
            // Exiting right now (a zombie has no namespaces).
            None => return Some(format!("pid {pid} has no network namespace (exiting)")),
        }
    }
    None
}

/// Reconciles under `lock`: tears down leases whose container is gone, then (full
/// mode) applies the state directory to the datapath ([`apply`]) and removes host veths
/// and port links no lease owns. Errors reading the state abort; failures cleaning one
/// thing are recorded in the report and the rest goes on.
pub async fn run(
    cfg: &NetConfig,
    lock: &Locked<'_>,
    nl: &Netlink,
    mode: Mode<'_>,
) -> Result<Report, ReconcileError> {
    let mut report = Report::default();
    let full = matches!(mode, Mode::Full);
    let skip = match mode {
        Mode::DeadPids { skip } => skip,
        Mode::Full => None,
    };
    release_gone(cfg, lock, nl, full, skip, &mut report).await?;
    if !full {
        // A lease whose prestart died before Persist has no ifindex, so its teardown
        // cannot name its port link once the veth is gone: sweep links of vanished
        // devices (cheap: a few pins and one netlink query each).
        if !report.leases_released.is_empty()
            && let Some(mut dp) = Datapath::open(&cfg.bpffs_dir)?
        {
            let owned: HashSet<u32> = ipam::list(lock)?.values().map(|l| l.host_ifindex).collect();
            sweep_port_links(&mut dp, nl, &owned, true, &mut report).await;
        }
        return Ok(report);
    }

    // Everything below is judged against the leases that remain. Without a lease file
    // this state directory never had a container (or --state-dir is wrong): do not
    // take the bridge's veths for orphans then.
    let leases_exist = lock.store().dir().join(ipam::LEASES_FILE).exists();
    let leases = ipam::list(lock)?;
    let mut dp = Datapath::open(&cfg.bpffs_dir)?;

    // Port forwards whose container has no lease: out of the table, the map and
    // conntrack.
    let orphans: Vec<Mapping> = portmap::load_table(lock)?
        .into_iter()
        .filter(|m| !leases.contains_key(&m.container_id))
        .collect();
    if !orphans.is_empty() {
        match portmap::remove(lock, dp.as_ref(), &orphans) {
            Ok(()) => report.port_maps_removed.extend(orphans.iter().map(|m| {
                format!(
                    "{} -> {}:{} ({})",
                    m.key(),
                    m.container_ip,
                    m.container_port,
                    m.container_id
                )
            })),
            Err(e) => report.failures.push(format!(
                "removing {} orphaned port forward(s): {}",
                orphans.len(),
                crate::error_chain(&e)
            )),
        }
    }

    let applied = apply::apply(lock, dp.as_mut())?;
    report.applied = applied.changes;
    report.failures.extend(applied.failures);

    if leases_exist {
        delete_orphan_veths(cfg, nl, &leases, &mut report).await?;
        // After the veths: a deleted veth's link stays pinned, detached.
        if let Some(dp) = dp.as_mut() {
            let owned: HashSet<u32> = leases.values().map(|l| l.host_ifindex).collect();
            sweep_port_links(dp, nl, &owned, false, &mut report).await;
        }
    }
    Ok(report)
}

/// Tears down and releases the leases whose container is gone (in full mode also
/// incomplete leases and leases whose veth is gone).
async fn release_gone(
    cfg: &NetConfig,
    lock: &Locked<'_>,
    nl: &Netlink,
    full: bool,
    skip: Option<&str>,
    report: &mut Report,
) -> Result<(), ReconcileError> {
    let proc = Path::new("/proc");
    for (id, lease) in ipam::list(lock)? {
        if skip == Some(id.as_str()) {
            continue;
        }
        let mut reason = match &lease.cni {
            // The runtime owns a CNI attachment's lifetime (DEL, GC): only a full
            // reconcile ends one, and only once its namespace and veth are both gone.
            Some(_) if !full => continue,
            Some(a) if Path::new(&a.netns).exists() => continue,
            Some(a) => Some(format!("CNI namespace {} is gone", a.netns)),
            None => pid_gone(proc, &lease),
        };
        if lease.cni.is_some()
            && nl
                .link_by_name(&lease.host_veth)
                .await?
                .is_some_and(|l| l.index == lease.host_ifindex)
        {
            continue;
        }
        if reason.is_none() && full {
            reason = if !lease.complete {
                Some("its prestart never finished (killed or failed)".to_owned())
            } else {
                match nl.link_by_name(&lease.host_veth).await? {
                    Some(l) if l.index == lease.host_ifindex => None,
                    _ => Some(format!(
                        "its host veth {} (ifindex {}) is gone",
                        lease.host_veth, lease.host_ifindex
                    )),
                }
            };
        }
        let Some(reason) = reason else { continue };
        log::info!("reconcile: container {id}: {reason}: tearing down");
        let failures = crate::container::teardown(cfg, lock, &id, &lease, nl).await;
        if failures > 0 {
            report.failures.push(format!(
                "container {id} ({reason}): teardown left {failures} item(s); lease kept"
            ));
            continue;
        }
        ipam::release(lock, &id)?;
        report.leases_released.push(Released {
            id,
            ip: lease.ip,
            pid: lease.pid,
            host_veth: lease.host_veth,
            reason,
        });
    }
    Ok(())
}

/// Deletes the host veths on the bridge that no lease owns.
async fn delete_orphan_veths(
    cfg: &NetConfig,
    nl: &Netlink,
    leases: &std::collections::BTreeMap<String, Lease>,
    report: &mut Report,
) -> Result<(), ReconcileError> {
    let Some(br) = nl.link_by_name(&cfg.bridge).await? else {
        return Ok(());
    };
    let owned: HashSet<(&str, u32)> = leases
        .values()
        .map(|l| (l.host_veth.as_str(), l.host_ifindex))
        .collect();
    for l in nl.links().await? {
        let ours = l.kind.as_deref() == Some("veth")
            && l.controller == Some(br.index)
            && veth::is_host_veth_name(&l.name);
        if !ours || owned.contains(&(l.name.as_str(), l.index)) {
            continue;
        }
        match nl.del_link(l.index).await {
            Ok(_) => report.veths_deleted.push(l.name),
            Err(e) => report.failures.push(format!(
                "deleting veth {}: {}",
                l.name,
                crate::error_chain(&e)
            )),
        }
    }
    Ok(())
}

/// Removes pinned `port-<ifindex>` links whose ifindex no lease owns; with
/// `only_vanished`, only those whose device no longer exists.
async fn sweep_port_links(
    dp: &mut Datapath,
    nl: &Netlink,
    owned: &HashSet<u32>,
    only_vanished: bool,
    report: &mut Report,
) {
    let pinned = match dp.port_links() {
        Ok(p) => p,
        Err(e) => {
            report.failures.push(crate::error_chain(&e));
            return;
        }
    };
    for i in pinned.into_iter().filter(|i| !owned.contains(i)) {
        if only_vanished && !matches!(nl.link_by_index(i).await, Ok(None)) {
            continue;
        }
        match dp.detach_port(i) {
            Ok(()) => report.port_links_removed.push(i),
            Err(e) => report.failures.push(format!(
                "removing pinned link port-{i}: {}",
                crate::error_chain(&e)
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_time_survives_odd_command_names() {
        let stat = "4370 (sle ep) S 1 4370 4370 0 -1 4194560 100 0 0 0 0 0 0 0 20 0 1 0 123456 2000000 100";
        assert_eq!(parse_start_time(stat), Some(123456));
        let odd = "7 (a) b) (c) R 1 7 7 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 99 0 0";
        assert_eq!(parse_start_time(odd), Some(99));
        assert_eq!(parse_start_time("7 (x) R 1"), None);
        assert_eq!(parse_start_time("garbage"), None);
        // This process.
        let me = std::process::id();
        assert!(pid_start_time_in(Path::new("/proc"), me).is_some());
    }

    fn lease(pid: u32, pid_start: Option<u64>, netns_ino: Option<u64>) -> Lease {
        Lease {
            ip: Ipv4Addr::new(10, 0, 0, 2),
            prefix_len: 24,
            gateway: Ipv4Addr::new(10, 0, 0, 1),
            ip6: None,
            prefix6_len: None,
            gateway6: None,
            pid,
            pid_start,
            netns_ino,
            host_veth: format!("netnsv0-{pid}"),
            host_ifindex: 5,
            mac: None,
            bridge: "netns0".into(),
            created_unix: 0,
            complete: true,
            ifname: None,
            cni: None,
        }
    }

    /// A fake /proc with one process: `<pid>/stat` and `<pid>/ns/net` (a plain file,
    /// whose inode stands in for the namespace's).
    fn fake_proc(pid: u32, start: u64) -> (tempfile::TempDir, u64) {
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path().join(pid.to_string());
        fs::create_dir_all(d.join("ns")).unwrap();
        fs::write(
            d.join("stat"),
            format!("{pid} (sleep) S 1 1 1 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 {start} 0 0\n"),
        )
        .unwrap();
        fs::write(d.join("ns/net"), b"").unwrap();
        let ino = fs::metadata(d.join("ns/net")).unwrap().ino();
        (tmp, ino)
    }

    #[test]
    fn liveness_by_pid_start_and_namespace() {
        let (proc, ino) = fake_proc(42, 1000);
        let p = proc.path();
        assert_eq!(pid_gone(p, &lease(42, Some(1000), Some(ino))), None);
        // Old leases without the records: existence only.
        assert_eq!(pid_gone(p, &lease(42, None, None)), None);
        let r = pid_gone(p, &lease(43, Some(1000), Some(ino))).unwrap();
        assert!(r.contains("no longer exists"), "{r}");
        let r = pid_gone(p, &lease(42, Some(999), Some(ino))).unwrap();
        assert!(r.contains("another process"), "{r}");
        let r = pid_gone(p, &lease(42, Some(1000), Some(ino + 1))).unwrap();
        assert!(r.contains("another network namespace"), "{r}");
        fs::remove_file(p.join("42/ns/net")).unwrap();
        let r = pid_gone(p, &lease(42, Some(1000), Some(ino))).unwrap();
        assert!(r.contains("exiting"), "{r}");
    }

    #[test]
    fn report_lines() {
        let mut r = Report::default();
        assert!(r.is_empty() && r.lines().is_empty());
        r.veths_deleted.push("netnsv0-9".into());
        r.port_links_removed.push(17);
        assert!(!r.is_empty());
        assert_eq!(
            r.lines(),
            [
                "deleted host veth netnsv0-9: no lease",
                "removed pinned link port-17: no lease"
            ]
        );
    }
}
