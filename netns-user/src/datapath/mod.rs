//! The eBPF datapath: loading, pinning, attaching, and the maps user space writes.
//!
//! The first caller loads the object and pins maps, programs and TCX links under
//! `<bpffs_dir>/v<LAYOUT_VERSION>/`; later callers (every hook, the CLI) open the pins.
//! A file lock serialises loading so nothing is loaded twice.

use std::net::Ipv4Addr;
use std::path::PathBuf;

use netns_common::Endpoint;

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
}

/// An open, loaded datapath (pinned maps opened from bpffs).
pub struct Datapath {
    _priv: (),
}

impl Datapath {
    /// Loads and attaches the datapath if it is not pinned yet (under a lock), otherwise
    /// opens the pins; in both cases refreshes the config map from `cfg`.
    pub fn ensure_loaded(cfg: &DatapathConfig) -> Result<Datapath, DatapathError> {
        let _ = cfg;
        todo!("datapath::ensure_loaded")
    }

    /// Opens an already loaded datapath; `Ok(None)` if nothing is pinned there.
    pub fn open(bpffs_dir: &std::path::Path) -> Result<Option<Datapath>, DatapathError> {
        let _ = bpffs_dir;
        todo!("datapath::open")
    }

    /// Attaches the bridge-port program to a container's host veth (TC ingress) and pins
    /// the link as `links/port-<ifindex>`.
    pub fn attach_port(&mut self, host_ifindex: u32) -> Result<(), DatapathError> {
        let _ = host_ifindex;
        todo!("datapath::attach_port")
    }

    /// Removes the pinned link of a bridge port (no error if absent).
    pub fn detach_port(&mut self, host_ifindex: u32) -> Result<(), DatapathError> {
        let _ = host_ifindex;
        todo!("datapath::detach_port")
    }

    /// Registers a container address.
    pub fn add_endpoint(&mut self, ip: Ipv4Addr, ep: Endpoint) -> Result<(), DatapathError> {
        let _ = (ip, ep);
        todo!("datapath::add_endpoint")
    }

    /// Unregisters a container address and purges its conntrack entries (no error if absent).
    pub fn remove_endpoint(&mut self, ip: Ipv4Addr) -> Result<(), DatapathError> {
        let _ = ip;
        todo!("datapath::remove_endpoint")
    }
}
