//! The eBPF datapath: loading, pinning, attaching, and the maps user space writes.
//!
//! The first caller loads the object and pins maps, programs and TCX links under
//! `<bpffs_dir>/v<LAYOUT_VERSION>/`; later callers (every hook, the CLI) open the pins.
//! An flock on that directory serialises loading, so nothing is loaded twice.
//!
//! Pin layout (`vN` is the layout version; an older `vM` next to it is detached and
//! removed when this version is ensured loaded, see [`old`]):
//! ```text
//! <bpffs_dir>/vN/maps/NETNS_*            maps (pinned by name by the loader)
//! <bpffs_dir>/vN/progs/<program>         programs, so later hooks attach without loading
//! <bpffs_dir>/vN/links/uplink-{egress,ingress}, links/port-<ifindex>   TCX links
//! ```

pub mod gc;
mod old;
mod pins;
mod sys;

use std::fs::{self, File};
use std::net::Ipv4Addr;
use std::os::unix::fs::{DirBuilderExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

use aya::maps::lpm_trie::{Key as LpmKey, LpmTrie};
use aya::maps::{Array, HashMap, MapData, PerCpuArray};
use aya::programs::links::FdLink;
use aya::programs::{CgroupSockAddr, SchedClassifier, TcAttachType};
use aya::{Ebpf, EbpfLoader, include_bytes_aligned};
use netns_common::{
    BridgePort, Config, CtEntry, CtKey, Endpoint, LAYOUT_VERSION, PortKey, PortTarget, SockKey,
    SockOrig, Stat, Timeouts, maps, progs,
};
use nix::fcntl::{Flock, FlockArg};

use crate::cli::Cidr;

pub use pins::Pins;

/// The eBPF object built by `build.rs` (aya-build).
static OBJECT: &[u8] = include_bytes_aligned!(concat!(env!("OUT_DIR"), "/netns"));

/// `statfs` magic of a bpffs mount.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// Errors at the datapath's edge.
#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    #[error("datapath not loaded under {0} (run a container or `netns load` first)")]
    NotLoaded(PathBuf),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Bpf(String),
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> DatapathError {
    let what = what.into();
    move |source| DatapathError::Io { what, source }
}

/// Wraps an aya error with its whole source chain (aya's Display omits the errno).
fn bpf<E: std::error::Error>(what: impl std::fmt::Display) -> impl FnOnce(E) -> DatapathError {
    move |e| {
        let mut msg = format!("{what}: {e}");
        let mut src = e.source();
        while let Some(s) = src {
            msg.push_str(&format!(": {s}"));
            src = s.source();
        }
        DatapathError::Bpf(msg)
    }
}

/// What the datapath needs to know about the host side of the network.
#[derive(Debug, Clone)]
pub struct DatapathConfig {
    /// Base bpffs directory; pins live in `<bpffs_dir>/v<LAYOUT_VERSION>`.
    pub bpffs_dir: PathBuf,
    pub uplink_ifindex: u32,
    /// The uplink's IPv4 address (masquerade source); None if it has none yet.
    pub uplink_addr: Option<Ipv4Addr>,
    pub bridge_ifindex: u32,
    pub gateway: Ipv4Addr,
    pub prefix_len: u8,
    /// Masquerade port range when a container's source port is taken.
    pub nat_ports: (u16, u16),
    /// Size of the conntrack table when the datapath is first loaded (None: default).
    pub ct_max: Option<u32>,
    /// `--allow-inbound`: what the inbound trie holds after [`Datapath::ensure_loaded`].
    pub allow_inbound: Vec<Cidr>,
}

impl DatapathConfig {
    fn to_map_value(&self) -> Result<Config, DatapathError> {
        let mask: u32 = if self.prefix_len == 0 {
            0
        } else {
            u32::MAX << (32 - u32::from(self.prefix_len.min(32)))
        };
        let gw = u32::from(self.gateway);
        let bridge_mac = sys::if_mac(&ifname(self.bridge_ifindex)?).map_err(io(format!(
            "reading the MAC of bridge ifindex {}",
            self.bridge_ifindex
        )))?;
        let netns_cookie =
            sys::netns_cookie().map_err(io("reading this network namespace's cookie"))?;
        Ok(Config {
            subnet: (gw & mask).to_be(),
            subnet_mask: mask.to_be(),
            gateway: gw.to_be(),
            uplink_addr: self.uplink_addr.map_or(0, |a| u32::from(a).to_be()),
            uplink_ifindex: self.uplink_ifindex,
            bridge_ifindex: self.bridge_ifindex,
            nat_port_min: self.nat_ports.0,
            nat_port_max: self.nat_ports.1,
            bridge_mac,
            _pad: [0; 2],
            netns_cookie,
            timeouts: Timeouts::default(),
        })
    }
}

/// An open, loaded datapath (pinned maps opened from bpffs).
pub struct Datapath {
    pins: Pins,
    /// Held while this process may load or re-attach; released on drop.
    _lock: Option<Flock<File>>,
}

/// One map's state for `netns datapath status`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct MapStatus {
    pub name: String,
    pub pin: PathBuf,
    pub entries: usize,
    pub max_entries: u32,
}

/// One attachment for `netns datapath status`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct LinkStatus {
    pub pin: PathBuf,
    pub program: String,
    pub ifindex: u32,
    pub attach: String,
}

impl Datapath {
    /// Loads and attaches the datapath if it is not pinned yet (under a lock), otherwise
    /// opens the pins; in both cases refreshes the config map from `cfg` and re-attaches
    /// the uplink programs if the uplink changed or its links are gone.
    pub fn ensure_loaded(cfg: &DatapathConfig) -> Result<Datapath, DatapathError> {
        let pins = Pins::new(&cfg.bpffs_dir);
        ensure_bpffs(&cfg.bpffs_dir)?;
        for d in [
            pins.root(),
            &pins.maps_dir(),
            &pins.progs_dir(),
            &pins.links_dir(),
        ] {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(d)
                .map_err(io(format!("creating {}", d.display())))?;
        }
        let lock = lock_dir(pins.root())?;
        if !pins.programs_pinned() {
            load_and_pin(&pins, cfg.ct_max).inspect_err(|_| pins.remove_programs())?;
            log::info!("datapath loaded and pinned under {}", pins.root().display());
        }
        let dp = Datapath {
            pins,
            _lock: Some(lock),
        };
        dp.write_config(cfg)?;
        dp.ensure_uplink(cfg)?;
        let (added, removed) = dp.sync_inbound(&cfg.allow_inbound)?;
        for c in added {
            log::info!("inbound allowed from {c}");
        }
        for c in removed {
            log::info!("inbound no longer allowed from {c}");
        }
        // Only once this version is attached: a load that fails leaves the old one be.
        // Still under the lock, so two hooks never remove the same old version.
        old::remove_old_versions(&cfg.bpffs_dir)?;
        Ok(dp)
    }

    /// Opens an already loaded datapath; `Ok(None)` if nothing is pinned there.
    pub fn open(bpffs_dir: &Path) -> Result<Option<Datapath>, DatapathError> {
        let pins = Pins::new(bpffs_dir);
        if !pins.map(maps::CONNTRACK).exists() {
            return Ok(None);
        }
        Ok(Some(Datapath { pins, _lock: None }))
    }

    /// Like [`Datapath::open`] but a missing datapath is an error.
    pub fn open_required(bpffs_dir: &Path) -> Result<Datapath, DatapathError> {
        Self::open(bpffs_dir)?
            .ok_or_else(|| DatapathError::NotLoaded(Pins::new(bpffs_dir).root().to_owned()))
    }

    pub fn pins(&self) -> &Pins {
        &self.pins
    }

    fn map_data(&self, name: &str) -> Result<MapData, DatapathError> {
        let p = self.pins.map(name);
        MapData::from_pin(&p).map_err(bpf(format!("opening pinned map {}", p.display())))
    }

    fn config_map(&self) -> Result<Array<MapData, Config>, DatapathError> {
        Array::try_from(aya::maps::Map::Array(self.map_data(maps::CONFIG)?))
            .map_err(bpf("config map"))
    }

    /// Writes the config, keeping conntrack timeouts already set (see `set_timeouts`).
    fn write_config(&self, cfg: &DatapathConfig) -> Result<(), DatapathError> {
        let mut m = self.config_map()?;
        let mut v = cfg.to_map_value()?;
        let old = m.get(&0, 0).map_err(bpf("reading config map"))?;
        if old.timeouts.gc_interval != 0 {
            v.timeouts = old.timeouts;
        }
        m.set(0, v, 0).map_err(bpf("writing config map"))
    }

    /// Changes the config in place (timeouts, GC interval).
    fn update_config(&self, f: impl FnOnce(&mut Config)) -> Result<(), DatapathError> {
        let mut m = self.config_map()?;
        let mut v = m.get(&0, 0).map_err(bpf("reading config map"))?;
        f(&mut v);
        m.set(0, v, 0).map_err(bpf("writing config map"))
    }

    /// Sets only the collector interval (the hook's `--gc-interval`).
    pub fn set_gc_interval(&self, secs: u32) -> Result<(), DatapathError> {
        self.update_config(|c| c.timeouts.gc_interval = secs.max(1))
    }

    /// Sets the conntrack timeouts and GC interval every collector uses.
    pub fn set_timeouts(&self, t: Timeouts) -> Result<(), DatapathError> {
        self.update_config(|c| c.timeouts = t)
    }

    /// The config the datapath runs with.
    pub fn config(&self) -> Result<Config, DatapathError> {
        self.config_map()?
            .get(&0, 0)
            .map_err(bpf("reading config map"))
    }

    /// Attaches the uplink programs unless their pinned links already point at the
    /// configured uplink. A stale link (uplink renamed or recreated) is replaced.
    fn ensure_uplink(&self, cfg: &DatapathConfig) -> Result<(), DatapathError> {
        for (prog, attach, link) in [
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
        ] {
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
            let _ = fs::remove_file(&pin);
            attach_pinned(&self.pins.prog(prog), cfg.uplink_ifindex, attach, &pin)?;
        }
        Ok(())
    }

    /// Attaches the socket programs (host processes reaching port forwards through
    /// loopback or a host address; bind reservation of mapped ports) to a cgroup v2
    /// directory, once: links are pinned as `links/cgroup-<program>`. The programs
    /// act only on sockets of the network namespace netns manages (netns cookie check),
    /// so attaching at the cgroup root does not affect other namespaces.
    pub fn attach_cgroup(&self, cgroup: &Path) -> Result<(), DatapathError> {
        use aya::programs::{CgroupAttachMode, CgroupSockAddrAttachType as T};
        let dir = File::open(cgroup).map_err(io(format!("opening cgroup {}", cgroup.display())))?;
        for (name, ty) in [
            (progs::SOCK_CONNECT4, T::Connect4),
            (progs::SOCK_SENDMSG4, T::UDPSendMsg4),
            (progs::SOCK_RECVMSG4, T::UDPRecvMsg4),
            (progs::SOCK_GETPEERNAME4, T::GetPeerName4),
            (progs::SOCK_BIND4, T::Bind4),
        ] {
            let link_pin = self.pins.link(&format!("cgroup-{name}"));
            if link_pin.exists() {
                continue;
            }
            let pin = self.pins.prog(name);
            let mut prog = CgroupSockAddr::from_pin(&pin, ty)
                .map_err(bpf(format!("opening {}", pin.display())))?;
            let id = prog
                // bpf_link_create takes no flags for cgroups: links always coexist.
                .attach(&dir, CgroupAttachMode::Single)
                .map_err(bpf(format!(
                    "attaching {name} to cgroup {}",
                    cgroup.display()
                )))?;
            let link = prog.take_link(id).map_err(bpf("taking link"))?;
            let fd: FdLink = link
                .try_into()
                .map_err(bpf("bpf_link expected (kernel >= 5.7)"))?;
            fd.pin(&link_pin)
                .map_err(bpf(format!("pinning {}", link_pin.display())))?;
        }
        Ok(())
    }

    /// Attaches the bridge-port program to a container's host veth (TC ingress) and pins
    /// the link as `links/port-<ifindex>`.
    pub fn attach_port(&mut self, host_ifindex: u32) -> Result<(), DatapathError> {
        let pin = self.pins.port_link(host_ifindex);
        // A pin left by an earlier veth that had the same ifindex is stale.
        let _ = fs::remove_file(&pin);
        attach_pinned(
            &self.pins.prog(progs::PORT_INGRESS),
            host_ifindex,
            TcAttachType::Ingress,
            &pin,
        )
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

    fn endpoints(&self) -> Result<HashMap<MapData, u32, Endpoint>, DatapathError> {
        HashMap::try_from(aya::maps::Map::HashMap(self.map_data(maps::ENDPOINTS)?))
            .map_err(bpf("endpoint map"))
    }

    fn bridge_ports(&self) -> Result<HashMap<MapData, u32, BridgePort>, DatapathError> {
        HashMap::try_from(aya::maps::Map::HashMap(self.map_data(maps::BRIDGE_PORTS)?))
            .map_err(bpf("bridge port map"))
    }

    /// Registers a container address, then opens its bridge port for frames from the
    /// container's own MAC and address (the port program drops everything on a port
    /// without an entry, so nothing passes before the endpoint exists).
    pub fn add_endpoint(&mut self, ip: Ipv4Addr, ep: Endpoint) -> Result<(), DatapathError> {
        let key = u32::from(ip).to_be();
        let mut eps = self.endpoints()?;
        eps.insert(key, ep, 0)
            .map_err(bpf(format!("registering endpoint {ip}")))?;
        if let Err(e) = self.set_bridge_port(ep.ifindex, bridge_port(ip, &ep)) {
            let _ = eps.remove(&key);
            return Err(e);
        }
        Ok(())
    }

    /// Writes the bridge-port entry of `ifindex`.
    pub fn set_bridge_port(&self, ifindex: u32, port: BridgePort) -> Result<(), DatapathError> {
        self.bridge_ports()?
            .insert(ifindex, port, 0)
            .map_err(bpf(format!("registering bridge port ifindex {ifindex}")))
    }

    /// All bridge-port entries (ifindex, entry).
    pub fn bridge_port_entries(&self) -> Result<Vec<(u32, BridgePort)>, DatapathError> {
        self.bridge_ports()?
            .iter()
            .filter(|r| !matches!(r, Err(e) if key_absent(e)))
            .collect::<Result<_, _>>()
            .map_err(bpf("reading bridge port map"))
    }

    /// Closes a bridge port (no error if absent).
    pub fn remove_bridge_port(&self, ifindex: u32) -> Result<(), DatapathError> {
        match self.bridge_ports()?.remove(&ifindex) {
            Ok(()) => Ok(()),
            Err(e) if key_absent(&e) => Ok(()),
            Err(e) => Err(bpf(format!("removing bridge port ifindex {ifindex}"))(e)),
        }
    }

    /// Registered endpoints (address in network order, entry).
    pub fn endpoint_entries(&self) -> Result<Vec<(u32, Endpoint)>, DatapathError> {
        self.endpoints()?
            .iter()
            .filter(|r| !matches!(r, Err(e) if key_absent(e)))
            .collect::<Result<_, _>>()
            .map_err(bpf("reading endpoint map"))
    }

    /// Unregisters a container address, closes its bridge port and purges its
    /// conntrack entries (no error if absent).
    pub fn remove_endpoint(&mut self, ip: Ipv4Addr) -> Result<(), DatapathError> {
        let key = u32::from(ip).to_be();
        let mut eps = self.endpoints()?;
        match eps.get(&key, 0) {
            Ok(ep) => {
                // Unless the ifindex already serves another container (reused ifindex).
                let bp = self.bridge_ports()?;
                match bp.get(&ep.ifindex, 0) {
                    Ok(p) if p.addr == key => self.remove_bridge_port(ep.ifindex)?,
                    Ok(_) => {}
                    Err(e) if key_absent(&e) => {}
                    Err(e) => return Err(bpf(format!("reading bridge port of {ip}"))(e)),
                }
            }
            Err(e) if key_absent(&e) => {}
            Err(e) => return Err(bpf(format!("reading endpoint {ip}"))(e)),
        }
        match eps.remove(&key) {
            Ok(()) => {}
            Err(e) if key_absent(&e) => {}
            Err(e) => return Err(bpf(format!("removing endpoint {ip}"))(e)),
        }
        self.purge_conntrack(|k, v| {
            k.tuple.saddr == key
                || k.tuple.daddr == key
                || v.xlat.saddr == key
                || v.xlat.daddr == key
        })?;
        Ok(())
    }

    fn conntrack(&self) -> Result<HashMap<MapData, CtKey, CtEntry>, DatapathError> {
        HashMap::try_from(aya::maps::Map::LruHashMap(self.map_data(maps::CONNTRACK)?))
            .map_err(bpf("conntrack map"))
    }

    /// All conntrack entries (both halves of every flow).
    pub fn conntrack_entries(&self) -> Result<Vec<(CtKey, CtEntry)>, DatapathError> {
        let ct = self.conntrack()?;
        let mut out = Vec::new();
        for item in ct.iter() {
            match item {
                Ok(kv) => out.push(kv),
                // An entry evicted or deleted while iterating: skip it.
                Err(e) if key_absent(&e) => {}
                Err(e) => return Err(bpf("reading conntrack map")(e)),
            }
        }
        Ok(out)
    }

    /// Deletes every conntrack entry matching `pred`; returns how many.
    pub fn purge_conntrack(
        &self,
        pred: impl Fn(&CtKey, &CtEntry) -> bool,
    ) -> Result<usize, DatapathError> {
        let doomed: Vec<CtKey> = self
            .conntrack_entries()?
            .into_iter()
            .filter(|(k, v)| pred(k, v))
            .map(|(k, _)| k)
            .collect();
        self.delete_conntrack(&doomed)
    }

    /// Deletes the given conntrack keys (absent ones are fine); returns how many went.
    /// For callers that already read the table: no second walk over it.
    pub fn delete_conntrack<'a>(
        &self,
        keys: impl IntoIterator<Item = &'a CtKey>,
    ) -> Result<usize, DatapathError> {
        let mut ct = self.conntrack()?;
        let mut n = 0;
        for k in keys {
            match ct.remove(k) {
                Ok(()) => n += 1,
                Err(e) if key_absent(&e) => {}
                Err(e) => return Err(bpf("deleting conntrack entry")(e)),
            }
        }
        self.add_stat(Stat::CtUserRemoved, n as u64)?;
        Ok(n)
    }

    fn inbound(&self) -> Result<LpmTrie<MapData, u32, u8>, DatapathError> {
        LpmTrie::try_from(aya::maps::Map::LpmTrie(self.map_data(maps::INBOUND)?))
            .map_err(bpf("inbound map"))
    }

    /// The `--allow-inbound` CIDRs in the trie.
    pub fn inbound_entries(&self) -> Result<Vec<Cidr>, DatapathError> {
        let m = self.inbound()?;
        let mut out = Vec::new();
        for k in m.keys() {
            match k {
                Ok(k) => out.push(Cidr {
                    network: Ipv4Addr::from(u32::from_be(k.data())),
                    prefix_len: k.prefix_len() as u8,
                }),
                Err(e) if key_absent(&e) => {}
                Err(e) => return Err(bpf("reading inbound map")(e)),
            }
        }
        Ok(out)
    }

    /// Makes the inbound trie hold exactly `want`; returns (added, removed).
    pub fn sync_inbound(&self, want: &[Cidr]) -> Result<(Vec<Cidr>, Vec<Cidr>), DatapathError> {
        let have: std::collections::HashSet<Cidr> = self.inbound_entries()?.into_iter().collect();
        let want: std::collections::HashSet<Cidr> = want.iter().copied().collect();
        let mut m = self.inbound()?;
        let key = |c: &Cidr| LpmKey::new(u32::from(c.prefix_len), u32::from(c.network).to_be());
        let mut removed: Vec<Cidr> = have.difference(&want).copied().collect();
        let mut added: Vec<Cidr> = want.difference(&have).copied().collect();
        removed.sort_by_key(|c| (c.network, c.prefix_len));
        added.sort_by_key(|c| (c.network, c.prefix_len));
        // Removals first: a full trie must still take the new set.
        for c in &removed {
            match m.remove(&key(c)) {
                Ok(()) => {}
                Err(e) if key_absent(&e) => {}
                Err(e) => return Err(bpf(format!("removing {c} from the inbound map"))(e)),
            }
        }
        for c in &added {
            m.insert(&key(c), 1, 0)
                .map_err(bpf(format!("adding {c} to the inbound map")))?;
        }
        Ok((added, removed))
    }

    /// Port-forward map.
    pub fn ports(&self) -> Result<HashMap<MapData, PortKey, PortTarget>, DatapathError> {
        HashMap::try_from(aya::maps::Map::HashMap(self.map_data(maps::PORTS)?))
            .map_err(bpf("port map"))
    }

    /// Adds to a counter from user space (CPU 0's slot).
    fn add_stat(&self, stat: Stat, n: u64) -> Result<(), DatapathError> {
        if n == 0 {
            return Ok(());
        }
        let mut m: PerCpuArray<MapData, u64> =
            PerCpuArray::try_from(aya::maps::Map::PerCpuArray(self.map_data(maps::STATS)?))
                .map_err(bpf("stats map"))?;
        let mut v = m.get(&(stat as u32), 0).map_err(bpf("reading stats map"))?;
        let mut vals: Vec<u64> = v.iter().copied().collect();
        vals[0] += n;
        v = aya::maps::PerCpuValues::try_from(vals).map_err(bpf("per-CPU values"))?;
        m.set(stat as u32, v, 0).map_err(bpf("writing stats map"))
    }

    /// Least-recently-used entries the kernel evicted from the full conntrack table:
    /// everything inserted minus everything deleted minus what is there now.
    pub fn ct_evictions(&self) -> Result<u64, DatapathError> {
        let s: std::collections::HashMap<Stat, u64> = self.stats()?.into_iter().collect();
        let inserted = 2 * s[&Stat::CtCreated] + s[&Stat::CtRebuilt];
        // A host reclaim deletes both halves of the container's pair.
        let removed = s[&Stat::CtRetired]
            + s[&Stat::DropCtInsert]
            + s[&Stat::CtUserRemoved]
            + 2 * s[&Stat::CtHostReclaimed];
        let live = self.conntrack_entries()?.len() as u64;
        Ok(inserted.saturating_sub(removed).saturating_sub(live))
    }

    /// Counters summed over CPUs, in `Stat::ALL` order.
    pub fn stats(&self) -> Result<Vec<(Stat, u64)>, DatapathError> {
        let m: PerCpuArray<MapData, u64> =
            PerCpuArray::try_from(aya::maps::Map::PerCpuArray(self.map_data(maps::STATS)?))
                .map_err(bpf("stats map"))?;
        Stat::ALL
            .iter()
            .map(|s| {
                let v = m.get(&(*s as u32), 0).map_err(bpf("reading stats map"))?;
                Ok((*s, v.iter().sum()))
            })
            .collect()
    }

    /// Maps with their pins and entry counts.
    pub fn map_status(&self) -> Result<Vec<MapStatus>, DatapathError> {
        let mut out = Vec::new();
        for name in [
            maps::CONNTRACK,
            maps::ENDPOINTS,
            maps::BRIDGE_PORTS,
            maps::PORTS,
            maps::INBOUND,
            maps::FRAGS,
            maps::SOCK_REVNAT,
            maps::CONFIG,
            maps::STATS,
        ] {
            let pin = self.pins.map(name);
            let data = self.map_data(name)?;
            let info = data.info().map_err(bpf(format!("map info of {name}")))?;
            let entries = match name {
                n if n == maps::CONNTRACK => self.conntrack_entries()?.len(),
                n if n == maps::ENDPOINTS => self.endpoints()?.keys().filter(Result::is_ok).count(),
                n if n == maps::BRIDGE_PORTS => {
                    self.bridge_ports()?.keys().filter(Result::is_ok).count()
                }
                n if n == maps::PORTS => self.ports()?.keys().filter(Result::is_ok).count(),
                n if n == maps::INBOUND => self.inbound()?.keys().filter(Result::is_ok).count(),
                n if n == maps::SOCK_REVNAT => {
                    let m: HashMap<MapData, SockKey, SockOrig> =
                        HashMap::try_from(aya::maps::Map::LruHashMap(data))
                            .map_err(bpf("socket reverse map"))?;
                    m.keys().filter(Result::is_ok).count()
                }
                n if n == maps::FRAGS => {
                    let m: HashMap<MapData, netns_common::FragKey, netns_common::FragPorts> =
                        HashMap::try_from(aya::maps::Map::LruHashMap(data))
                            .map_err(bpf("frag map"))?;
                    m.keys().filter(Result::is_ok).count()
                }
                _ => info.max_entries() as usize,
            };
            out.push(MapStatus {
                name: name.to_owned(),
                pin,
                entries,
                max_entries: info.max_entries(),
            });
        }
        Ok(out)
    }

    /// The kernel id of a pinned program (for aya-log's `init_from_id`).
    pub fn program_id(&self, name: &str) -> Result<u32, DatapathError> {
        let pin = self.pins.prog(name);
        let prog =
            SchedClassifier::from_pin(&pin).map_err(bpf(format!("opening {}", pin.display())))?;
        let info = prog
            .info()
            .map_err(bpf(format!("program info of {name}")))?;
        Ok(info.id())
    }

    /// Pinned programs as `name (id N, tag T)`.
    pub fn program_status(&self) -> Result<Vec<String>, DatapathError> {
        let mut out = Vec::new();
        for name in Pins::TC_PROGS.iter().chain(Pins::SOCK_PROGS.iter()) {
            let pin = self.pins.prog(name);
            let line = match sys::prog_id(&pin) {
                Ok(id) => format!("{name} (id {id}) {}", pin.display()),
                Err(e) => format!("{name}: MISSING ({e}) {}", pin.display()),
            };
            out.push(line);
        }
        Ok(out)
    }

    /// Pinned links with what they attach where.
    pub fn link_status(&self) -> Result<Vec<LinkStatus>, DatapathError> {
        let mut out = Vec::new();
        let dir = self.pins.links_dir();
        let rd = match fs::read_dir(&dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
            Err(e) => return Err(io(format!("reading {}", dir.display()))(e)),
        };
        let mut names: Vec<_> = rd.filter_map(Result::ok).map(|e| e.path()).collect();
        names.sort();
        for pin in names {
            let file = pin
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or_default()
                .to_owned();
            let (program, attach) = if let Some(p) = file.strip_prefix("cgroup-") {
                (p, "cgroup")
            } else if file == Pins::UPLINK_EGRESS_LINK {
                (progs::UPLINK_EGRESS, "tcx/egress")
            } else if file == Pins::UPLINK_INGRESS_LINK {
                (progs::UPLINK_INGRESS, "tcx/ingress")
            } else {
                (progs::PORT_INGRESS, "tcx/ingress")
            };
            let ifindex = if attach == "cgroup" {
                0
            } else {
                link_ifindex(&pin).unwrap_or(0)
            };
            out.push(LinkStatus {
                pin,
                program: program.to_owned(),
                ifindex,
                attach: attach.to_owned(),
            });
        }
        Ok(out)
    }

    /// Replaces every program with the ones of this binary's object, keeping the maps
    /// (conntrack, port forwards, endpoints): each pinned link is switched to the new
    /// program atomically (BPF_LINK_UPDATE), so established flows see no gap.
    /// Returns the programs replaced.
    pub fn reload(&self) -> Result<Vec<String>, DatapathError> {
        let staging = self.pins.root().join("progs_new");
        let _ = fs::remove_dir_all(&staging);
        fs::DirBuilder::new()
            .mode(0o700)
            .create(&staging)
            .map_err(io(format!("creating {}", staging.display())))?;
        let result = (|| {
            let staged = Pins::staged(&self.pins, &staging);
            load_and_pin(&staged, None)?;
            let mut replaced = Vec::new();
            for link in self.link_status()? {
                let new_prog = staging.join(&link.program);
                sys::link_update(&link.pin, &new_prog).map_err(io(format!(
                    "switching {} to the new {}",
                    link.pin.display(),
                    link.program
                )))?;
                replaced.push(link.pin.display().to_string());
            }
            for name in Pins::TC_PROGS.iter().chain(Pins::SOCK_PROGS.iter()) {
                let (from, to) = (staging.join(name), self.pins.prog(name));
                fs::rename(&from, &to).map_err(io(format!(
                    "moving {} to {}",
                    from.display(),
                    to.display()
                )))?;
            }
            Ok(replaced)
        })();
        let _ = fs::remove_dir_all(&staging);
        result
    }

    /// Verifies every attachment and re-attaches what is missing or detached: the
    /// uplink programs, each registered container's bridge port, and the cgroup
    /// programs (if `cgroup` is given). Returns what it repaired.
    pub fn check(
        &self,
        cfg: &DatapathConfig,
        cgroup: Option<&Path>,
    ) -> Result<Vec<String>, DatapathError> {
        let mut repaired = Vec::new();
        for (prog, link) in [
            (progs::UPLINK_EGRESS, Pins::UPLINK_EGRESS_LINK),
            (progs::UPLINK_INGRESS, Pins::UPLINK_INGRESS_LINK),
        ] {
            if link_ifindex(&self.pins.link(link)) != Some(cfg.uplink_ifindex) {
                repaired.push(format!("{prog} on uplink ifindex {}", cfg.uplink_ifindex));
            }
        }
        self.write_config(cfg)?;
        self.ensure_uplink(cfg)?;
        let eps: Vec<(u32, Endpoint)> = self.endpoints()?.iter().filter_map(Result::ok).collect();
        for (addr, ep) in eps {
            let pin = self.pins.port_link(ep.ifindex);
            if link_ifindex(&pin) != Some(ep.ifindex) {
                let _ = fs::remove_file(&pin);
                match attach_pinned(
                    &self.pins.prog(progs::PORT_INGRESS),
                    ep.ifindex,
                    TcAttachType::Ingress,
                    &pin,
                ) {
                    Ok(()) => repaired.push(format!(
                        "{} on bridge port ifindex {} ({})",
                        progs::PORT_INGRESS,
                        ep.ifindex,
                        Ipv4Addr::from(u32::from_be(addr))
                    )),
                    Err(e) => repaired.push(format!(
                        "could not re-attach port ifindex {}: {e}",
                        ep.ifindex
                    )),
                }
            }
        }
        if let Some(cg) = cgroup {
            for name in Pins::SOCK_PROGS {
                let pin = self.pins.link(&format!("cgroup-{name}"));
                let alive = sys::link_info(&pin).is_ok_and(|i| i.cgroup_id != 0);
                if !alive {
                    let _ = fs::remove_file(&pin);
                    repaired.push(format!("{name} on cgroup {}", cg.display()));
                }
            }
            self.attach_cgroup(cg)?;
        }
        Ok(repaired)
    }

    /// Removes every pin (programs, links, maps): the datapath is gone once no process
    /// holds a reference.
    pub fn unload(self) -> Result<(), DatapathError> {
        let root = self.pins.root().to_owned();
        fs::remove_dir_all(&root).map_err(io(format!("removing {}", root.display())))
    }
}

/// The bridge-port entry of a container.
pub fn bridge_port(ip: Ipv4Addr, ep: &Endpoint) -> BridgePort {
    BridgePort {
        addr: u32::from(ip).to_be(),
        mac: ep.mac,
        _pad: [0; 2],
    }
}

/// Is this map error "no such key"? aya 0.14 reports a failed delete of a missing key
/// as a syscall error with ENOENT, a failed lookup as `KeyNotFound`.
pub fn key_absent(e: &aya::maps::MapError) -> bool {
    match e {
        aya::maps::MapError::KeyNotFound => true,
        aya::maps::MapError::SyscallError(s) => s.io_error.raw_os_error() == Some(libc::ENOENT),
        _ => false,
    }
}

/// The ifindex a pinned TCX link is attached to, None if there is no pin or the link's
/// device is gone.
fn link_ifindex(pin: &Path) -> Option<u32> {
    let info = sys::link_info(pin).ok()?;
    (info.ifindex != 0).then_some(info.ifindex)
}

fn ifname(ifindex: u32) -> Result<String, DatapathError> {
    let mut buf = [0u8; libc::IF_NAMESIZE];
    // SAFETY: buf has IF_NAMESIZE bytes as if_indextoname requires.
    let p = unsafe { libc::if_indextoname(ifindex, buf.as_mut_ptr().cast()) };
    if p.is_null() {
        return Err(io(format!("no interface with ifindex {ifindex}"))(
            std::io::Error::last_os_error(),
        ));
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    Ok(String::from_utf8_lossy(&buf[..end]).into_owned())
}

/// Attaches a pinned program to `ifindex` with a TCX link and pins the link at `link_pin`.
fn attach_pinned(
    prog_pin: &Path,
    ifindex: u32,
    attach: TcAttachType,
    link_pin: &Path,
) -> Result<(), DatapathError> {
    let name = ifname(ifindex)?;
    let mut prog = SchedClassifier::from_pin(prog_pin)
        .map_err(bpf(format!("opening {}", prog_pin.display())))?;
    let id = prog
        .attach(&name, attach)
        .map_err(bpf(format!("attaching {} to {name}", prog_pin.display())))?;
    let link = prog.take_link(id).map_err(bpf("taking link"))?;
    let fd: FdLink = link
        .try_into()
        .map_err(bpf("TCX link expected (kernel >= 6.6)"))?;
    fd.pin(link_pin)
        .map_err(bpf(format!("pinning {}", link_pin.display())))?;
    Ok(())
}

/// Loads the object with maps pinned by name, and pins each program.
fn load_and_pin(pins: &impl pins::PinLayout, ct_max: Option<u32>) -> Result<(), DatapathError> {
    if OBJECT.is_empty() {
        return Err(DatapathError::Bpf(
            "this binary was built with AYA_BUILD_SKIP: it carries no eBPF object".into(),
        ));
    }
    let mut loader = EbpfLoader::new();
    loader.default_map_pin_directory(pins.maps_dir());
    if let Some(n) = ct_max {
        loader.map_max_entries(maps::CONNTRACK, n);
    }
    let mut ebpf: Ebpf = loader.load(OBJECT).map_err(bpf("loading eBPF object"))?;
    for name in Pins::TC_PROGS {
        let prog: &mut SchedClassifier = program(&mut ebpf, name)?;
        load_pin(prog, name, &pins.prog(name))?;
    }
    for name in Pins::SOCK_PROGS {
        let prog: &mut CgroupSockAddr = program(&mut ebpf, name)?;
        load_pin(prog, name, &pins.prog(name))?;
    }
    restrict_pins(pins.root());
    Ok(())
}

/// A program of the object, as its concrete type.
fn program<'a, P>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut P, DatapathError>
where
    &'a mut P: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    ebpf.program_mut(name)
        .ok_or_else(|| DatapathError::Bpf(format!("program {name} missing from object")))?
        .try_into()
        .map_err(bpf(format!("{name} has an unexpected program type")))
}

/// What loading and pinning need of a program, whatever its type.
trait Loadable {
    fn load_it(&mut self) -> Result<(), aya::programs::ProgramError>;
    fn pin_it(&mut self, path: &Path) -> Result<(), aya::pin::PinError>;
}

impl Loadable for SchedClassifier {
    fn load_it(&mut self) -> Result<(), aya::programs::ProgramError> {
        self.load()
    }
    fn pin_it(&mut self, path: &Path) -> Result<(), aya::pin::PinError> {
        self.pin(path)
    }
}

impl Loadable for CgroupSockAddr {
    fn load_it(&mut self) -> Result<(), aya::programs::ProgramError> {
        self.load()
    }
    fn pin_it(&mut self, path: &Path) -> Result<(), aya::pin::PinError> {
        self.pin(path)
    }
}

fn load_pin(prog: &mut impl Loadable, name: &str, pin: &Path) -> Result<(), DatapathError> {
    prog.load_it()
        .map_err(bpf(format!("verifier rejected {name}")))?;
    let _ = fs::remove_file(pin);
    prog.pin_it(pin)
        .map_err(bpf(format!("pinning {}", pin.display())))
}

/// Pins are root-only: they allow rewriting any container's traffic.
fn restrict_pins(root: &Path) {
    fn walk(p: &Path) {
        let _ = fs::set_permissions(
            p,
            fs::Permissions::from_mode(if p.is_dir() { 0o700 } else { 0o600 }),
        );
        if let Ok(rd) = fs::read_dir(p) {
            for e in rd.flatten() {
                walk(&e.path());
            }
        }
    }
    walk(root);
}

fn lock_dir(dir: &Path) -> Result<Flock<File>, DatapathError> {
    let f = File::open(dir).map_err(io(format!("opening {}", dir.display())))?;
    Flock::lock(f, FlockArg::LockExclusive)
        .map_err(|(_, e)| io(format!("locking {}", dir.display()))(std::io::Error::from(e)))
}

/// Makes sure `dir` lives on a bpffs; mounts one at /sys/fs/bpf if that is where `dir`
/// points and nothing is mounted there yet (systemd normally does this).
fn ensure_bpffs(dir: &Path) -> Result<(), DatapathError> {
    let sysfs_bpf = Path::new("/sys/fs/bpf");
    let probe = if dir.exists() {
        dir
    } else {
        dir.parent().unwrap_or(dir)
    };
    let on_bpffs =
        |p: &Path| nix::sys::statfs::statfs(p).is_ok_and(|s| s.filesystem_type().0 == BPF_FS_MAGIC);
    if on_bpffs(probe) {
        return Ok(());
    }
    if dir.starts_with(sysfs_bpf) && !on_bpffs(sysfs_bpf) {
        nix::mount::mount(
            Some("bpf"),
            sysfs_bpf,
            Some("bpf"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        )
        .map_err(|e| io("mounting bpffs on /sys/fs/bpf")(std::io::Error::from(e)))?;
        if on_bpffs(probe) || on_bpffs(sysfs_bpf) {
            return Ok(());
        }
    }
    Err(DatapathError::Bpf(format!(
        "{} is not on a bpffs mount (mount -t bpf bpf /sys/fs/bpf, or pass --bpffs-dir under a bpffs)",
        dir.display()
    )))
}

/// The layout version the running binary expects.
pub const fn layout_version() -> u32 {
    LAYOUT_VERSION
}
