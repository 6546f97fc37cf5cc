//! The eBPF datapath: loading, pinning, attaching, and typed access to the maps user
//! space writes.
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
//!
//! | module | owns |
//! |---|---|
//! | `loader` | load and pin the object, reload, unload, the bpffs mount and the loader lock |
//! | `attach` | TCX and cgroup links: attach, detach, `check` |
//! | `status` | what `netns datapath status` reports |
//! | `config`, `endpoints`, `ports`, `inbound`, `stats` | one typed map each |
//! | `conntrack` | the conntrack maps: both tables, the copies, the per-container counts |
//! | [`gc`] | what the datapath treats as absent (expired, stale), the sweep |
//! | `old`, `pins`, `sys` | older layouts, pin paths, the bpf(2) calls aya lacks |
//!
//! Hash maps are read with BPF_MAP_LOOKUP_BATCH, one pass over their buckets
//! ([`sys::lookup_batch`]), never key by key.
//!
//! The typed maps take and return host-order values and netns types (`Ipv4Addr`,
//! `SocketAddrV4`, [`Proto`]); byte order is converted in those modules only, and no
//! aya map type leaves this module.

mod attach;
mod config;
mod conntrack;
pub mod conntrack6;
mod endpoints;
pub mod gc;
mod inbound;
mod loader;
mod old;
mod pins;
mod ports;
mod stats;
mod status;
mod sys;

use std::fs::File;
use std::path::{Path, PathBuf};

use aya::maps::MapData;
use netns_common::{LAYOUT_VERSION, maps};
use nix::fcntl::Flock;

pub use crate::config::Cidr;
pub use attach::{CheckFailure, CheckReport};
pub use config::{DatapathConfig, Settings};
pub use conntrack::{
    ConntrackEntry, ConntrackKeep, ConntrackKey, ConntrackSizes, CtFlags, CtState, CtTable, Dir,
    FlowKind, Tuple,
};
pub use conntrack6::{Flow6, flows6};
pub use endpoints::{BridgePort, BridgePorts, Endpoint, Endpoints};
pub use ports::{
    PortForward, PortForward6, PortForward6Key, PortForwardKey, PortForwards, PortForwards6, Proto,
};
pub use status::{Attach, LinkStatus, MapStatus, ProgramStatus, Status};

pub use pins::Pins;

/// Errors at the datapath's edge. Each says what was being done; the aya or system
/// error is kept as the source ([`crate::error_chain`] prints the whole chain).
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
    #[error("{what}: {source}")]
    Map {
        what: String,
        #[source]
        source: Box<aya::maps::MapError>,
    },
    #[error("{what}: {source}")]
    Program {
        what: String,
        #[source]
        source: Box<aya::programs::ProgramError>,
    },
    #[error("{what}: {source}")]
    Link {
        what: String,
        #[source]
        source: Box<aya::programs::links::LinkError>,
    },
    #[error("{what}: {source}")]
    Pin {
        what: String,
        #[source]
        source: Box<aya::pin::PinError>,
    },
    #[error("loading the eBPF object: {0}")]
    Load(#[source] Box<aya::EbpfError>),
    #[error("reading the MAC of bridge ifindex {ifindex}")]
    BridgeMac {
        ifindex: u32,
        #[source]
        source: crate::network::NetlinkError,
    },
    #[error("bridge ifindex {0} does not exist or has no Ethernet address")]
    NoBridgeMac(u32),
    #[error("this binary was built with AYA_BUILD_SKIP: it carries no eBPF object")]
    NoObject,
    #[error("program {0} missing from the eBPF object")]
    MissingProgram(String),
    #[error(
        "{0} is not on a bpffs mount (mount -t bpf bpf /sys/fs/bpf, or pass --bpffs-dir under a bpffs)"
    )]
    NotBpffs(PathBuf),
    /// `datapath check` could not re-attach everything: a partial repair.
    #[error("datapath check: {failed} attachment(s) could not be repaired (partial repair)")]
    CheckIncomplete { failed: usize },
}

impl DatapathError {
    /// Does this error mean "no such key" in a map? aya 0.14 reports a failed delete of
    /// a missing key as a syscall error with ENOENT, a failed lookup as `KeyNotFound`.
    fn key_absent(e: &aya::maps::MapError) -> bool {
        match e {
            aya::maps::MapError::KeyNotFound => true,
            aya::maps::MapError::SyscallError(s) => s.io_error.raw_os_error() == Some(libc::ENOENT),
            _ => false,
        }
    }
}

pub(crate) fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> DatapathError {
    let what = what.into();
    move |source| DatapathError::Io { what, source }
}

pub(crate) fn map_err(
    what: impl Into<String>,
) -> impl FnOnce(aya::maps::MapError) -> DatapathError {
    let what = what.into();
    move |source| DatapathError::Map {
        what,
        source: Box::new(source),
    }
}

pub(crate) fn prog_err(
    what: impl Into<String>,
) -> impl FnOnce(aya::programs::ProgramError) -> DatapathError {
    let what = what.into();
    move |source| DatapathError::Program {
        what,
        source: Box::new(source),
    }
}

pub(crate) fn link_err(
    what: impl Into<String>,
) -> impl FnOnce(aya::programs::links::LinkError) -> DatapathError {
    let what = what.into();
    move |source| DatapathError::Link {
        what,
        source: Box::new(source),
    }
}

pub(crate) fn pin_err(what: impl Into<String>) -> impl FnOnce(aya::pin::PinError) -> DatapathError {
    let what = what.into();
    move |source| DatapathError::Pin {
        what,
        source: Box::new(source),
    }
}

/// `Ok(None)` for a missing key, the value otherwise.
fn absent_ok<T>(
    r: Result<T, aya::maps::MapError>,
    what: impl Into<String>,
) -> Result<Option<T>, DatapathError> {
    match r {
        Ok(v) => Ok(Some(v)),
        Err(e) if DatapathError::key_absent(&e) => Ok(None),
        Err(e) => Err(map_err(what)(e)),
    }
}

/// Every entry of a hash map, in one pass over its buckets ([`sys::lookup_batch`]): one
/// deleted (or evicted) while listing is skipped, and the walk ends whatever changes.
fn hash_entries<K: aya::Pod, V: aya::Pod>(
    m: &aya::maps::HashMap<MapData, K, V>,
    what: &str,
) -> Result<Vec<(K, V)>, DatapathError> {
    sys::lookup_batch(m).map_err(io(what))
}

/// Deletes every entry of the hash map `name` (one batch read, one batch delete);
/// returns how many went.
fn clear_map<K: aya::Pod, V: aya::Pod>(
    m: &mut aya::maps::HashMap<MapData, K, V>,
    name: &str,
) -> Result<usize, DatapathError> {
    let keys: Vec<K> = sys::lookup_batch(m)
        .map_err(io(format!("reading {name}")))?
        .into_iter()
        .map(|(k, _)| k)
        .collect();
    sys::delete_batch(m, &keys).map_err(io(format!("deleting from {name}")))
}

/// How many entries a hash map holds now (0 if it cannot be read).
fn key_count<K: aya::Pod, V: aya::Pod>(m: &aya::maps::HashMap<MapData, K, V>) -> usize {
    sys::lookup_batch(m).map_or(0, |v| v.len())
}

/// An open, loaded datapath (pinned maps opened from bpffs).
pub struct Datapath {
    pins: Pins,
    /// Held while this process may load or re-attach; released on drop.
    _lock: Option<Flock<File>>,
    /// This process loaded the object (nothing of this layout was pinned before).
    fresh: bool,
}

impl Datapath {
    /// Opens an already loaded datapath; `Ok(None)` if nothing is pinned there.
    pub fn open(bpffs_dir: &Path) -> Result<Option<Datapath>, DatapathError> {
        let pins = Pins::new(bpffs_dir);
        if !pins.map(maps::CONNTRACK).exists() {
            return Ok(None);
        }
        Ok(Some(Datapath {
            pins,
            _lock: None,
            fresh: false,
        }))
    }

    /// Like [`Datapath::open`] but a missing datapath is an error.
    pub fn open_required(bpffs_dir: &Path) -> Result<Datapath, DatapathError> {
        Self::open(bpffs_dir)?
            .ok_or_else(|| DatapathError::NotLoaded(Pins::new(bpffs_dir).root().to_owned()))
    }

    pub fn pins(&self) -> &Pins {
        &self.pins
    }

    /// True if [`Datapath::ensure_loaded`] loaded the object in this call (first use,
    /// after `datapath unload`, or an upgrade from another layout): the maps are empty
    /// and the state directory must be applied to them (`crate::apply`).
    pub fn freshly_loaded(&self) -> bool {
        self.fresh
    }

    fn map_data(&self, name: &str) -> Result<MapData, DatapathError> {
        let p = self.pins.map(name);
        MapData::from_pin(&p).map_err(map_err(format!("opening pinned map {}", p.display())))
    }

    /// Opens the pinned hash map `name` (an LRU one with `lru`), typed.
    fn hash_map<K: aya::Pod, V: aya::Pod>(
        &self,
        name: &str,
        lru: bool,
        what: &str,
    ) -> Result<aya::maps::HashMap<MapData, K, V>, DatapathError> {
        let data = self.map_data(name)?;
        let m = if lru {
            aya::maps::Map::LruHashMap(data)
        } else {
            aya::maps::Map::HashMap(data)
        };
        aya::maps::HashMap::try_from(m).map_err(map_err(what))
    }
}

/// The layout version the running binary expects.
pub const fn layout_version() -> u32 {
    LAYOUT_VERSION
}
