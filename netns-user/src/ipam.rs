//! IPv4 address management for the bridge subnet.
//!
//! Leases live in `<state>/leases.json`, keyed by container id; a lease is also the
//! container's record (what poststop and `ls` read). Every function takes a
//! [`Locked`] store, so allocation is serialised across processes by the store's flock.
//!
//! Allocation uses a rotating cursor: the search starts after the last address handed
//! out and wraps around. A released address is therefore reused only after the rest of
//! the subnet has been cycled through (or is taken), which keeps a new container from
//! inheriting the old one's stale neighbour-cache entries in peers and flows that still
//! linger in the datapath's conntrack map. Small subnets still reuse addresses at once.

use std::collections::{BTreeMap, HashSet};
use std::net::{Ipv4Addr, Ipv6Addr};

use serde::{Deserialize, Serialize};

use crate::config::{Gateway, Gateway6};
use crate::store::{Locked, StoreError};

pub const LEASES_FILE: &str = "leases.json";

#[derive(Debug, thiserror::Error)]
pub enum IpamError {
    #[error("no free address left in {subnet} ({leases} leases)")]
    Exhausted { subnet: String, leases: usize },
    #[error(
        "state directory holds {leases} leases in subnet {stored}, but this hook runs with subnet {requested}: \
         use another --state-dir per subnet, or stop those containers first"
    )]
    SubnetMismatch {
        stored: String,
        requested: String,
        leases: usize,
    },
    #[error("address {ip} is outside the bridge subnet {subnet}")]
    OutsideSubnet { ip: Ipv4Addr, subnet: String },
    #[error("address {ip} is the gateway, network or broadcast address of {subnet}")]
    Reserved { ip: Ipv4Addr, subnet: String },
    #[error("address {ip} is already leased to {owner}")]
    Taken { ip: Ipv4Addr, owner: String },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What a CNI runtime identifies an attachment by (a lease made by the CNI plugin;
/// the hook's leases have none). Its lifetime is the runtime's: DEL and GC end it,
/// never a /proc check.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CniAttachment {
    pub container_id: String,
    pub ifname: String,
    /// The network (config `name`) it belongs to: GC only judges its own network's.
    pub network: String,
    /// CNI_NETNS at ADD.
    pub netns: String,
    /// The delegated IPAM plugin that owns the address, if not netns's own IPAM.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipam: Option<String>,
}

/// One container's address and the resources made for it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    pub ip: Ipv4Addr,
    pub prefix_len: u8,
    pub gateway: Ipv4Addr,
    /// With `--ip6`: the IPv6 address (the prefix plus `ip`'s host offset), its prefix
    /// length and the bridge's IPv6 gateway.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip6: Option<Ipv6Addr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix6_len: Option<u8>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway6: Option<Ipv6Addr>,
    /// Container pid at prestart (teardown never relies on it; reconcile checks it is
    /// still the same process in the same namespace).
    pub pid: u32,
    /// Start time of `pid` (clock ticks after boot, /proc/<pid>/stat field 22): a pid
    /// reused by another process has another start time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid_start: Option<u64>,
    /// Inode of the container's network namespace (/proc/<pid>/ns/net).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub netns_ino: Option<u64>,
    /// Host end of the veth; known before it is created, so a crashed prestart can
    /// still be cleaned up.
    pub host_veth: String,
    /// Ifindex of `host_veth`; 0 until the veth exists.
    #[serde(default)]
    pub host_ifindex: u32,
    /// The container's eth0 MAC (`aa:bb:cc:dd:ee:ff`), once known.
    #[serde(default)]
    pub mac: Option<String>,
    pub bridge: String,
    pub created_unix: u64,
    /// Set by the last prestart step: everything (veth, datapath entries) is in place.
    #[serde(default)]
    pub complete: bool,
    /// The interface name inside the container (None: `eth0`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ifname: Option<String>,
    /// Set for attachments made by the CNI plugin (pid is 0 then).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cni: Option<CniAttachment>,
}

impl Lease {
    /// The IPv6 address, prefix length and gateway, when the lease has IPv6.
    pub fn addr6(&self) -> Option<(Ipv6Addr, u8, Ipv6Addr)> {
        Some((self.ip6?, self.prefix6_len?, self.gateway6?))
    }

    /// Sets (or, with None, clears) the IPv6 part from `--ip6`: derived from the IPv4
    /// address, so it needs no allocation of its own. True if it changed.
    pub fn set_ip6(&mut self, gw: Gateway, gw6: Option<Gateway6>) -> bool {
        let want = gw6.map(|g| (g.host_for(gw, self.ip), g.prefix_len, g.addr));
        let changed = self.addr6() != want;
        self.ip6 = want.map(|w| w.0);
        self.prefix6_len = want.map(|w| w.1);
        self.gateway6 = want.map(|w| w.2);
        changed
    }

    /// The interface name inside the container.
    pub fn ifname(&self) -> &str {
        self.ifname
            .as_deref()
            .unwrap_or(crate::config::DEFAULT_IFNAME)
    }
}

/// What the caller knows at allocation time.
#[derive(Debug, Clone)]
pub struct LeaseRequest {
    pub pid: u32,
    pub pid_start: Option<u64>,
    pub netns_ino: Option<u64>,
    pub host_veth: String,
    pub bridge: String,
    /// The address to lease (an IPAM plugin chose it); None: the next free one.
    pub fixed_ip: Option<Ipv4Addr>,
    pub ifname: Option<String>,
    pub cni: Option<CniAttachment>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct LeaseFile {
    /// The subnet these leases belong to (`a.b.c.d/n`).
    #[serde(default)]
    subnet: Option<String>,
    /// Last address handed out: the rotating cursor.
    #[serde(default)]
    last: Option<Ipv4Addr>,
    #[serde(default)]
    leases: BTreeMap<String, Lease>,
}

fn load(lock: &Locked<'_>) -> Result<LeaseFile, IpamError> {
    Ok(lock.read(LEASES_FILE)?.unwrap_or_default())
}

fn save(lock: &Locked<'_>, f: &LeaseFile) -> Result<(), IpamError> {
    Ok(lock.write(LEASES_FILE, f)?)
}

/// Allocates an address for `id`, or returns its existing lease (same id, same
/// address). The bool is true if the lease is new.
pub fn allocate(
    lock: &Locked<'_>,
    gw: Gateway,
    id: &str,
    req: LeaseRequest,
) -> Result<(Lease, bool), IpamError> {
    let mut f = load(lock)?;
    if let Some(l) = f.leases.get(id) {
        return Ok((l.clone(), false));
    }
    let subnet = gw.subnet();
    match &f.subnet {
        Some(s) if *s != subnet && !f.leases.is_empty() => {
            return Err(IpamError::SubnetMismatch {
                stored: s.clone(),
                requested: subnet,
                leases: f.leases.len(),
            });
        }
        Some(s) if *s != subnet => f.last = None,
        _ => {}
    }
    let ip = match req.fixed_ip {
        Some(ip) => check_fixed(gw, ip, &f.leases)?,
        None => pick(gw, f.last, &f.leases).ok_or_else(|| IpamError::Exhausted {
            subnet: subnet.clone(),
            leases: f.leases.len(),
        })?,
    };
    let lease = Lease {
        ip,
        prefix_len: gw.prefix_len,
        gateway: gw.addr,
        ip6: None,
        prefix6_len: None,
        gateway6: None,
        pid: req.pid,
        pid_start: req.pid_start,
        netns_ino: req.netns_ino,
        host_veth: req.host_veth,
        host_ifindex: 0,
        mac: None,
        bridge: req.bridge,
        created_unix: now_unix(),
        complete: false,
        ifname: req.ifname,
        cni: req.cni,
    };
    f.subnet = Some(subnet);
    if req.fixed_ip.is_none() {
        f.last = Some(ip);
    }
    f.leases.insert(id.to_owned(), lease.clone());
    save(lock, &f)?;
    Ok((lease, true))
}

/// An address chosen elsewhere must be a free host address of the bridge subnet.
fn check_fixed(
    gw: Gateway,
    ip: Ipv4Addr,
    leases: &BTreeMap<String, Lease>,
) -> Result<Ipv4Addr, IpamError> {
    let subnet = gw.subnet();
    if u32::from(ip) & gw.mask() != u32::from(gw.network()) {
        return Err(IpamError::OutsideSubnet { ip, subnet });
    }
    if ip == gw.addr || ip == gw.network() || ip == gw.broadcast() {
        return Err(IpamError::Reserved { ip, subnet });
    }
    if let Some((owner, _)) = leases.iter().find(|(_, l)| l.ip == ip) {
        return Err(IpamError::Taken {
            ip,
            owner: owner.clone(),
        });
    }
    Ok(ip)
}

/// The first free host address after `last` (wrapping), skipping the network,
/// broadcast and gateway addresses.
fn pick(gw: Gateway, last: Option<Ipv4Addr>, leases: &BTreeMap<String, Lease>) -> Option<Ipv4Addr> {
    let net = u32::from(gw.network());
    let bcast = u32::from(gw.broadcast());
    let (first, end) = (net + 1, bcast - 1);
    let used: HashSet<u32> = leases.values().map(|l| u32::from(l.ip)).collect();
    let start = match last.map(u32::from) {
        Some(l) if (first..end).contains(&l) => l + 1,
        _ => first,
    };
    let size = end - first + 1;
    (0..size)
        .map(|i| first + (start - first + i) % size)
        .find(|a| *a != u32::from(gw.addr) && !used.contains(a))
        .map(Ipv4Addr::from)
}

/// Replaces the lease of `id` (which must exist; a missing one is recreated).
pub fn update(lock: &Locked<'_>, id: &str, lease: &Lease) -> Result<(), IpamError> {
    let mut f = load(lock)?;
    f.leases.insert(id.to_owned(), lease.clone());
    save(lock, &f)
}

/// Releases the lease of `id`, returning it; `None` if there was none.
pub fn release(lock: &Locked<'_>, id: &str) -> Result<Option<Lease>, IpamError> {
    let mut f = load(lock)?;
    let old = f.leases.remove(id);
    if old.is_some() {
        save(lock, &f)?;
    }
    Ok(old)
}

pub fn get(lock: &Locked<'_>, id: &str) -> Result<Option<Lease>, IpamError> {
    Ok(load(lock)?.leases.remove(id))
}

/// All leases, by container id.
pub fn list(lock: &Locked<'_>) -> Result<BTreeMap<String, Lease>, IpamError> {
    Ok(load(lock)?.leases)
}

/// Seconds since the epoch (0 if the clock is before it).
pub fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Store;

    fn req(pid: u32) -> LeaseRequest {
        LeaseRequest {
            pid,
            pid_start: None,
            netns_ino: None,
            host_veth: format!("netnsv0-{pid}"),
            bridge: "netns0".into(),
            fixed_ip: None,
            ifname: None,
            cni: None,
        }
    }

    #[test]
    fn fixed_addresses_are_checked() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::open(tmp.path()).unwrap();
        let l = store.lock().unwrap();
        let g = gw("10.9.0.1/24");
        let fixed = |ip: [u8; 4]| LeaseRequest {
            fixed_ip: Some(Ipv4Addr::from(ip)),
            ..req(1)
        };
        let (a, _) = allocate(&l, g, "a", fixed([10, 9, 0, 77])).unwrap();
        assert_eq!(a.ip, Ipv4Addr::new(10, 9, 0, 77));
        assert!(matches!(
            allocate(&l, g, "b", fixed([10, 9, 0, 77])),
            Err(IpamError::Taken { .. })
        ));
        assert!(matches!(
            allocate(&l, g, "b", fixed([10, 9, 1, 2])),
            Err(IpamError::OutsideSubnet { .. })
        ));
        for r in [[10, 9, 0, 1], [10, 9, 0, 0], [10, 9, 0, 255]] {
            assert!(matches!(
                allocate(&l, g, "b", fixed(r)),
                Err(IpamError::Reserved { .. })
            ));
        }
        // The pool skips it, and a fixed lease does not move the cursor.
        let (b, _) = allocate(&l, g, "b", req(2)).unwrap();
        assert_eq!(b.ip, Ipv4Addr::new(10, 9, 0, 2));
    }

    fn gw(s: &str) -> Gateway {
        s.parse().unwrap()
    }

    #[test]
    fn allocates_skipping_network_gateway_broadcast() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::open(tmp.path()).unwrap();
        let l = store.lock().unwrap();
        // Gateway in the middle of a /29: .0 network, .3 gateway, .7 broadcast.
        let g = gw("10.9.0.3/29");
        let got: Vec<Ipv4Addr> = (0..5)
            .map(|i| allocate(&l, g, &format!("c{i}"), req(i)).unwrap().0.ip)
            .collect();
        let want: Vec<Ipv4Addr> = [1, 2, 4, 5, 6]
            .iter()
            .map(|o| Ipv4Addr::new(10, 9, 0, *o))
            .collect();
        assert_eq!(got, want);
        let lease = get(&l, "c0").unwrap().unwrap();
        assert_eq!(
            (lease.prefix_len, lease.gateway),
            (29, Ipv4Addr::new(10, 9, 0, 3))
        );
        assert!(!lease.complete);
    }

    #[test]
    fn exhaustion_names_the_subnet() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::open(tmp.path()).unwrap();
        let l = store.lock().unwrap();
        let g = gw("192.168.7.1/30"); // one usable address besides the gateway
        allocate(&l, g, "a", req(1)).unwrap();
        let e = allocate(&l, g, "b", req(2)).unwrap_err();
        assert!(matches!(e, IpamError::Exhausted { .. }));
        assert!(e.to_string().contains("192.168.7.0/30"), "{e}");
    }

    #[test]
    fn same_id_same_address() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::open(tmp.path()).unwrap();
        let l = store.lock().unwrap();
        let g = gw("172.19.0.1/16");
        let (a, new_a) = allocate(&l, g, "x", req(1)).unwrap();
        let (b, new_b) = allocate(&l, g, "x", req(2)).unwrap();
        assert!(new_a && !new_b);
        assert_eq!(a, b);
        assert_eq!(list(&l).unwrap().len(), 1);
    }

    #[test]
    fn release_and_reuse() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::open(tmp.path()).unwrap();
        let l = store.lock().unwrap();
        let g = gw("10.0.0.1/24");
        let a = allocate(&l, g, "a", req(1)).unwrap().0.ip;
        let b = allocate(&l, g, "b", req(2)).unwrap().0.ip;
        assert_eq!(
            (a, b),
            (Ipv4Addr::new(10, 0, 0, 2), Ipv4Addr::new(10, 0, 0, 3))
        );
        assert_eq!(release(&l, "a").unwrap().unwrap().ip, a);
        assert_eq!(release(&l, "a").unwrap(), None);
        // The cursor moves on rather than handing out .2 again at once...
        assert_eq!(
            allocate(&l, g, "c", req(3)).unwrap().0.ip,
            Ipv4Addr::new(10, 0, 0, 4)
        );
        // ...but a full subnet reuses released addresses.
        // .5 to .254, then the wrap reaches the released .2.
        for i in 0..251 {
            allocate(&l, g, &format!("f{i}"), req(10 + i)).unwrap();
        }
        assert_eq!(get(&l, "f250").unwrap().unwrap().ip, a);
        assert!(matches!(
            allocate(&l, g, "z", req(9)),
            Err(IpamError::Exhausted { .. })
        ));
        release(&l, "f100").unwrap();
        release(&l, "b").unwrap();
        // The cursor sits at .2, so the search finds .3 before .105.
        assert_eq!(allocate(&l, g, "z", req(9)).unwrap().0.ip, b);
    }

    #[test]
    fn reuse_in_a_tiny_subnet_is_immediate() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::open(tmp.path()).unwrap();
        let l = store.lock().unwrap();
        let g = gw("10.0.0.1/30");
        let a = allocate(&l, g, "a", req(1)).unwrap().0.ip;
        release(&l, "a").unwrap();
        assert_eq!(allocate(&l, g, "b", req(2)).unwrap().0.ip, a);
    }

    #[test]
    fn update_persists() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::open(tmp.path()).unwrap();
        let l = store.lock().unwrap();
        let g = gw("10.0.0.1/24");
        let (mut lease, _) = allocate(&l, g, "a", req(1)).unwrap();
        lease.host_ifindex = 7;
        lease.complete = true;
        update(&l, "a", &lease).unwrap();
        drop(l);
        let l = store.lock_shared().unwrap();
        assert_eq!(get(&l, "a").unwrap().unwrap(), lease);
    }

    #[test]
    fn subnet_change_with_live_leases_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::open(tmp.path()).unwrap();
        let l = store.lock().unwrap();
        allocate(&l, gw("10.0.0.1/24"), "a", req(1)).unwrap();
        let e = allocate(&l, gw("10.1.0.1/24"), "b", req(2)).unwrap_err();
        assert!(matches!(e, IpamError::SubnetMismatch { .. }), "{e}");
        release(&l, "a").unwrap();
        assert_eq!(
            allocate(&l, gw("10.1.0.1/24"), "b", req(2)).unwrap().0.ip,
            Ipv4Addr::new(10, 1, 0, 2)
        );
    }

    const CHILD_DIR: &str = "NETNS_IPAM_TEST_CHILD_DIR";
    const CHILD_IDX: &str = "NETNS_IPAM_TEST_CHILD_IDX";
    const PROCS: usize = 8;
    const PER_PROC: usize = 25;

    /// One child process's part: PER_PROC allocations, one lock each so that the
    /// processes interleave, the addresses written to `got-<idx>`.
    fn allocate_as_child(dir: &str, idx: &str) {
        // All start together: the parent creates `go` once every child is running.
        let go = std::path::Path::new(dir).join("go");
        let t0 = std::time::Instant::now();
        while !go.exists() {
            assert!(t0.elapsed().as_secs() < 20, "no go from the parent");
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        let store = Store::open(std::path::Path::new(dir)).unwrap();
        let mut got = Vec::new();
        for i in 0..PER_PROC {
            let l = store.lock().unwrap();
            let (lease, new) = allocate(
                &l,
                gw("10.77.0.1/24"),
                &format!("p{idx}-{i}"),
                req(i as u32),
            )
            .unwrap();
            assert!(new);
            got.push(lease.ip.to_string());
        }
        std::fs::write(format!("{dir}/got-{idx}"), got.join("\n")).unwrap();
    }

    /// PROCS processes allocate from one state directory at once. The test re-runs its
    /// own binary, filtered to itself, with CHILD_DIR/CHILD_IDX set: in that role it is
    /// the child (no test here passes without doing its work).
    #[test]
    fn concurrent_processes_never_share_an_address() {
        if let (Ok(dir), Ok(idx)) = (std::env::var(CHILD_DIR), std::env::var(CHILD_IDX)) {
            allocate_as_child(&dir, &idx);
            return;
        }
        // libtest's name for this test: the module path without the crate.
        let me = format!(
            "{}::concurrent_processes_never_share_an_address",
            module_path!().split_once("::").map_or("", |(_, m)| m)
        );
        let tmp = tempfile::tempdir().unwrap();
        let exe = std::env::current_exe().unwrap();
        let children: Vec<_> = (0..PROCS)
            .map(|idx| {
                std::process::Command::new(&exe)
                    .args(["--exact", &me, "--test-threads=1"])
                    .env(CHILD_DIR, tmp.path())
                    .env(CHILD_IDX, idx.to_string())
                    .stdout(std::process::Stdio::piped())
                    .stderr(std::process::Stdio::piped())
                    .spawn()
                    .unwrap()
            })
            .collect();
        std::fs::write(tmp.path().join("go"), "").unwrap();
        for (idx, c) in children.into_iter().enumerate() {
            let o = c.wait_with_output().unwrap();
            let out = String::from_utf8_lossy(&o.stdout);
            assert!(
                o.status.success() && out.contains("1 passed"),
                "child {idx} ({me}) did not run and pass: {}\n{out}{}",
                o.status,
                String::from_utf8_lossy(&o.stderr)
            );
        }
        let mut all = Vec::new();
        for idx in 0..PROCS {
            let s = std::fs::read_to_string(tmp.path().join(format!("got-{idx}"))).unwrap();
            all.extend(s.lines().map(str::to_owned));
        }
        assert_eq!(all.len(), PROCS * PER_PROC);
        let distinct: HashSet<_> = all.iter().collect();
        assert_eq!(distinct.len(), all.len(), "an address was handed out twice");
        let store = Store::open(tmp.path()).unwrap();
        let leases = list(&store.lock().unwrap()).unwrap();
        assert_eq!(leases.len(), PROCS * PER_PROC, "a lease was lost");
    }
}
