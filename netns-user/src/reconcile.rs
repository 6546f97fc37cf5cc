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
//!   whose veth is gone, then port forwards, endpoints, bridge-port entries, port links
//!   and host veths that no lease owns; port-map entries that differ from the table
//!   (missing, or a host IP that moved to another interface) are rewritten, and the
//!   reservation of mapped ports follows the table.
//!
//! A container is gone when its pid does not exist, when the pid now belongs to a
//! process with another start time (pid reuse), or when the pid lives in another
//! network namespace than the one recorded at prestart.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::fs;
use std::net::Ipv4Addr;
use std::os::unix::fs::MetadataExt as _;
use std::path::Path;

use aya::maps::{HashMap as BpfHashMap, MapData};
use netns_common::{BridgePort, Endpoint, PortKey, maps};
use serde::Serialize;

use crate::cli::GlobalArgs;
use crate::datapath::{self, Datapath, DatapathError};
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
    /// Datapath port-map entries in no table (a hook killed between writing the map
    /// and the table).
    pub port_entries_removed: Vec<String>,
    /// Datapath port-map entries rewritten from the table (`HOST -> TARGET (id)`).
    pub port_entries_repaired: Vec<String>,
    /// Datapath endpoints of addresses without a lease.
    pub endpoints_removed: Vec<Ipv4Addr>,
    /// Bridge-port entries (ifindex) of no endpoint.
    pub bridge_ports_removed: Vec<u32>,
    /// Bridge-port entries (ifindex) rewritten from their endpoint.
    pub bridge_ports_repaired: Vec<u32>,
    /// Host ports added to ip_local_reserved_ports (compact ranges), if any.
    pub ports_reserved: Option<String>,
    /// Host ports netns had reserved that no mapping uses any more, if any.
    pub ports_released: Option<String>,
    pub veths_deleted: Vec<String>,
    /// Ifindexes whose pinned `port-<ifindex>` link was removed.
    pub port_links_removed: Vec<u32>,
    /// What could not be cleaned (logged; retried next time).
    pub failures: Vec<String>,
}

impl Report {
    pub fn is_empty(&self) -> bool {
        self.leases_released.is_empty()
            && self.port_maps_removed.is_empty()
            && self.port_entries_removed.is_empty()
            && self.port_entries_repaired.is_empty()
            && self.endpoints_removed.is_empty()
            && self.bridge_ports_removed.is_empty()
            && self.bridge_ports_repaired.is_empty()
            && self.ports_reserved.is_none()
            && self.ports_released.is_none()
            && self.veths_deleted.is_empty()
            && self.port_links_removed.is_empty()
            && self.failures.is_empty()
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
        for m in &self.port_entries_removed {
            out.push(format!("removed datapath port entry {m}: in no port table"));
        }
        for m in &self.port_entries_repaired {
            out.push(format!("rewrote datapath port entry {m}: missing or stale"));
        }
        for ip in &self.endpoints_removed {
            out.push(format!("removed datapath endpoint {ip}: no lease"));
        }
        for i in &self.bridge_ports_removed {
            out.push(format!(
                "removed bridge port entry of ifindex {i}: no endpoint"
            ));
        }
        for i in &self.bridge_ports_repaired {
            out.push(format!(
                "rewrote bridge port entry of ifindex {i}: missing or not its endpoint's"
            ));
        }
        if let Some(p) = &self.ports_reserved {
            out.push(format!("reserved mapped host port(s) {p}"));
        }
        if let Some(p) = &self.ports_released {
            out.push(format!(
                "released reserved host port(s) {p}: no longer mapped"
            ));
        }
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

/// Reconciles under `lock`. Errors reading the state abort; failures cleaning one
/// thing are recorded in the report and the rest goes on.
pub async fn run(
    g: &GlobalArgs,
    lock: &Locked<'_>,
    nl: &Netlink,
    mode: Mode<'_>,
) -> Result<Report, ReconcileError> {
    let proc = Path::new("/proc");
    let mut report = Report::default();
    let full = matches!(mode, Mode::Full);
    let skip = match mode {
        Mode::DeadPids { skip } => skip,
        Mode::Full => None,
    };

    // 1. Leases whose container is gone: the poststop teardown, then release.
    for (id, lease) in ipam::list(lock)? {
        if skip == Some(id.as_str()) {
            continue;
        }
        let mut reason = pid_gone(proc, &lease);
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
        let failures = crate::hook::teardown(g, lock, &id, &lease, nl).await;
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
    if !full {
        // A lease whose prestart died before Persist has no ifindex, so its teardown
        // cannot name its port link once the veth is gone: sweep links of vanished
        // devices (cheap: a few pins and one netlink query each).
        if !report.leases_released.is_empty()
            && let Some(mut dp) = Datapath::open(&g.bpffs_dir)?
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
    let ids: HashSet<&str> = leases.keys().map(String::as_str).collect();
    let ips: HashSet<Ipv4Addr> = leases.values().map(|l| l.ip).collect();
    let ifindexes: HashSet<u32> = leases.values().map(|l| l.host_ifindex).collect();
    let mut dp = Datapath::open(&g.bpffs_dir)?;

    // 2. Port forwards whose container has no lease.
    let table = portmap::load_table(lock)?;
    let orphans: Vec<Mapping> = table
        .iter()
        .filter(|m| !ids.contains(m.container_id.as_str()))
        .cloned()
        .collect();
    if !orphans.is_empty() {
        match portmap::remove(lock, dp.as_ref(), &orphans) {
            Ok(()) => report
                .port_maps_removed
                .extend(orphans.iter().map(describe)),
            Err(e) => report.failures.push(format!(
                "removing {} orphaned port forward(s): {}",
                orphans.len(),
                crate::error_chain(&e)
            )),
        }
    }

    // The reservation follows what remains (also without a datapath: the table is
    // what counts).
    let table = portmap::load_table(lock)?;
    match crate::reserve::sync(lock, &table) {
        Ok(c) => {
            report.ports_reserved = (!c.reserved.is_empty()).then(|| c.reserved.to_string());
            report.ports_released = (!c.released.is_empty()).then(|| c.released.to_string());
        }
        Err(e) => report.failures.push(format!(
            "reserving mapped host ports: {}",
            crate::error_chain(&e)
        )),
    }

    if let Some(dp) = dp.as_mut() {
        // 3. Port-map entries in no table that point at no leased address; entries of
        // the table that are missing or stale.
        let known: HashSet<PortKey> = table.iter().map(Mapping::key).collect();
        if let Err(e) = orphan_port_entries(dp, &known, &ips, &mut report) {
            report
                .failures
                .push(format!("port map entries: {}", crate::error_chain(&e)));
        }
        // Only mappings of leased containers (an orphan step 2 failed to remove stays out).
        let live: Vec<Mapping> = table
            .iter()
            .filter(|m| ids.contains(m.container_id.as_str()))
            .cloned()
            .collect();
        if let Err(e) = repair_port_entries(dp, &live, &mut report) {
            report
                .failures
                .push(format!("port map entries: {}", crate::error_chain(&e)));
        }
        // 4. Endpoints without a lease, then bridge ports without an endpoint.
        if let Err(e) = orphan_endpoints(dp, &ips, &mut report) {
            report
                .failures
                .push(format!("endpoints: {}", crate::error_chain(&e)));
        }
        if let Err(e) = orphan_bridge_ports(dp, &mut report) {
            report
                .failures
                .push(format!("bridge ports: {}", crate::error_chain(&e)));
        }
    }

    // 5. Host veths on the bridge that no lease owns.
    if leases_exist && let Some(br) = nl.link_by_name(&g.bridge).await? {
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
    }

    // 6. Pinned port links of ifindexes without a lease (after 5: a deleted veth's
    // link stays pinned, detached).
    if leases_exist && let Some(dp) = dp.as_mut() {
        sweep_port_links(dp, nl, &ifindexes, false, &mut report).await;
    }
    Ok(report)
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
    let links = dp.pins().links_dir();
    let pinned: BTreeSet<u32> = fs::read_dir(&links)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            e.file_name()
                .to_str()?
                .strip_prefix("port-")?
                .parse::<u32>()
                .ok()
        })
        .collect();
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

pub(crate) use crate::datapath::key_absent as map_key_absent;

/// The addresses registered in the datapath's endpoint map.
pub(crate) fn endpoint_ips(dp: &Datapath) -> Result<HashSet<Ipv4Addr>, DatapathError> {
    let pin = dp.pins().map(maps::ENDPOINTS);
    let data = MapData::from_pin(&pin)
        .map_err(|e| DatapathError::Bpf(format!("opening {}: {e}", pin.display())))?;
    let eps: BpfHashMap<MapData, u32, Endpoint> =
        BpfHashMap::try_from(aya::maps::Map::HashMap(data))
            .map_err(|e| DatapathError::Bpf(format!("endpoint map: {e}")))?;
    Ok(eps
        .keys()
        .filter_map(Result::ok)
        .map(|k| Ipv4Addr::from(u32::from_be(k)))
        .collect())
}

fn describe(m: &Mapping) -> String {
    let host = match m.host_ip {
        Some(ip) => format!("{ip}:{}", m.host_port),
        None => format!("*:{}", m.host_port),
    };
    format!(
        "{host}/{} -> {}:{} ({})",
        m.proto, m.container_ip, m.container_port, m.container_id
    )
}

/// Rewrites the datapath entry of every mapping whose entry is missing or differs from
/// what the table gives now (the interface of its host IP included). A host IP that is
/// no longer local is left alone: nothing can arrive for it.
fn repair_port_entries(
    dp: &Datapath,
    table: &[Mapping],
    report: &mut Report,
) -> Result<(), PortMapError> {
    if table.is_empty() {
        return Ok(());
    }
    let addrs = portmap::local_addrs_for(table)?;
    let mut map = dp.ports()?;
    for m in table {
        let want = match m.target(&addrs) {
            Ok(t) => t,
            Err(PortMapError::NotLocal(ip)) => {
                log::debug!(
                    "port forward {}: {ip} is not local now; entry left as is",
                    describe(m)
                );
                continue;
            }
            Err(e) => return Err(e),
        };
        match map.get(&m.key(), 0) {
            Ok(have) if have == want => continue,
            Ok(_) => {}
            Err(e) if map_key_absent(&e) => {}
            Err(e) => {
                return Err(
                    DatapathError::Bpf(format!("reading port entry {}: {e}", describe(m))).into(),
                );
            }
        }
        match map.insert(m.key(), want, 0) {
            Ok(()) => report.port_entries_repaired.push(describe(m)),
            Err(e) => report
                .failures
                .push(format!("rewriting port entry {}: {e}", describe(m))),
        }
    }
    Ok(())
}

/// Removes bridge-port entries whose ifindex no endpoint has (the port would otherwise
/// keep accepting that MAC and address), and rewrites those that differ from their
/// endpoint (a port without its entry drops all of the container's frames).
fn orphan_bridge_ports(dp: &Datapath, report: &mut Report) -> Result<(), DatapathError> {
    let want: HashMap<u32, BridgePort> = dp
        .endpoint_entries()?
        .iter()
        .map(|(addr, ep)| {
            let ip = Ipv4Addr::from(u32::from_be(*addr));
            (ep.ifindex, datapath::bridge_port(ip, ep))
        })
        .collect();
    let have: HashMap<u32, BridgePort> = dp.bridge_port_entries()?.into_iter().collect();
    for i in have.keys().filter(|i| !want.contains_key(i)) {
        match dp.remove_bridge_port(*i) {
            Ok(()) => report.bridge_ports_removed.push(*i),
            Err(e) => report.failures.push(format!(
                "removing bridge port entry of ifindex {i}: {}",
                crate::error_chain(&e)
            )),
        }
    }
    for (i, p) in &want {
        if have.get(i) == Some(p) {
            continue;
        }
        match dp.set_bridge_port(*i, *p) {
            Ok(()) => report.bridge_ports_repaired.push(*i),
            Err(e) => report.failures.push(format!(
                "rewriting bridge port entry of ifindex {i}: {}",
                crate::error_chain(&e)
            )),
        }
    }
    report.bridge_ports_removed.sort_unstable();
    report.bridge_ports_repaired.sort_unstable();
    Ok(())
}

fn orphan_port_entries(
    dp: &Datapath,
    known: &HashSet<PortKey>,
    ips: &HashSet<Ipv4Addr>,
    report: &mut Report,
) -> Result<(), DatapathError> {
    let mut map = dp.ports()?;
    let doomed: Vec<(PortKey, Ipv4Addr, u16)> = map
        .iter()
        .filter_map(Result::ok)
        .filter_map(|(k, t)| {
            let ip = Ipv4Addr::from(u32::from_be(t.addr));
            (!known.contains(&k) && !ips.contains(&ip)).then_some((k, ip, u16::from_be(t.port)))
        })
        .collect();
    for (k, ip, port) in doomed {
        let host = match k.host_addr {
            0 => "*".to_owned(),
            a => Ipv4Addr::from(u32::from_be(a)).to_string(),
        };
        let proto = match k.proto {
            netns_common::IPPROTO_TCP => "tcp".to_owned(),
            netns_common::IPPROTO_UDP => "udp".to_owned(),
            p => p.to_string(),
        };
        let what = format!(
            "{host}:{}/{proto} -> {ip}:{port}",
            u16::from_be(k.host_port)
        );
        match map.remove(&k) {
            Ok(()) => report.port_entries_removed.push(what),
            Err(e) if map_key_absent(&e) => {}
            Err(e) => report
                .failures
                .push(format!("removing port entry {what}: {e}")),
        }
    }
    Ok(())
}

fn orphan_endpoints(
    dp: &mut Datapath,
    ips: &HashSet<Ipv4Addr>,
    report: &mut Report,
) -> Result<(), DatapathError> {
    let doomed: Vec<Ipv4Addr> = endpoint_ips(dp)?
        .into_iter()
        .filter(|ip| !ips.contains(ip))
        .collect();
    for ip in doomed {
        match dp.remove_endpoint(ip) {
            Ok(()) => report.endpoints_removed.push(ip),
            Err(e) => report.failures.push(format!(
                "removing endpoint {ip}: {}",
                crate::error_chain(&e)
            )),
        }
    }
    Ok(())
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
            pid,
            pid_start,
            netns_ino,
            host_veth: format!("netnsv0-{pid}"),
            host_ifindex: 5,
            mac: None,
            bridge: "netns0".into(),
            created_unix: 0,
            complete: true,
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
