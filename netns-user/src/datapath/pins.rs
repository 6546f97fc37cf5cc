//! Where the datapath's objects live in bpffs.

use std::fs;
use std::path::{Path, PathBuf};

use netns_common::{LAYOUT_VERSION, progs};

/// Paths of every pinned object, rooted at `<bpffs_dir>/v<LAYOUT_VERSION>`: a new map
/// layout gets a new directory instead of silently opening old maps.
#[derive(Debug, Clone)]
pub struct Pins {
    root: PathBuf,
}

impl Pins {
    pub const UPLINK_EGRESS_LINK: &'static str = "uplink-egress";
    pub const UPLINK_INGRESS_LINK: &'static str = "uplink-ingress";

    pub const TC_PROGS: [&'static str; 3] = [
        progs::UPLINK_EGRESS,
        progs::UPLINK_INGRESS,
        progs::PORT_INGRESS,
    ];
    pub const SOCK_PROGS: [&'static str; 10] = [
        progs::SOCK_CONNECT4,
        progs::SOCK_SENDMSG4,
        progs::SOCK_RECVMSG4,
        progs::SOCK_GETPEERNAME4,
        progs::SOCK_BIND4,
        progs::SOCK_CONNECT6,
        progs::SOCK_SENDMSG6,
        progs::SOCK_RECVMSG6,
        progs::SOCK_GETPEERNAME6,
        progs::SOCK_BIND6,
    ];

    pub fn new(bpffs_dir: &Path) -> Self {
        Self {
            root: bpffs_dir.join(format!("v{LAYOUT_VERSION}")),
        }
    }

    /// Pins whose programs go to `progs_dir` but whose maps are `live`'s (for reload).
    pub fn staged(live: &Pins, progs_dir: &Path) -> StagedPins {
        StagedPins {
            live: live.clone(),
            progs: progs_dir.to_owned(),
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn maps_dir(&self) -> PathBuf {
        self.root.join("maps")
    }

    pub fn progs_dir(&self) -> PathBuf {
        self.root.join("progs")
    }

    pub fn links_dir(&self) -> PathBuf {
        self.root.join("links")
    }

    pub fn map(&self, name: &str) -> PathBuf {
        self.maps_dir().join(name)
    }

    pub fn prog(&self, name: &str) -> PathBuf {
        self.progs_dir().join(name)
    }

    pub fn link(&self, name: &str) -> PathBuf {
        self.links_dir().join(name)
    }

    pub fn port_link(&self, ifindex: u32) -> PathBuf {
        self.link(&format!("port-{ifindex}"))
    }

    pub fn programs_pinned(&self) -> bool {
        Self::TC_PROGS
            .iter()
            .chain(Self::SOCK_PROGS.iter())
            .all(|p| self.prog(p).exists())
    }

    /// Rolls back a failed load: programs go, maps stay (they may hold live flows).
    pub fn remove_programs(&self) {
        for p in Self::TC_PROGS.iter().chain(Self::SOCK_PROGS.iter()) {
            let _ = fs::remove_file(self.prog(p));
        }
    }
}

/// Pins for a reload: maps of the live datapath, programs in a staging directory.
pub struct StagedPins {
    live: Pins,
    progs: PathBuf,
}

/// What `load_and_pin` needs to know about where things go.
pub trait PinLayout {
    fn maps_dir(&self) -> PathBuf;
    fn prog(&self, name: &str) -> PathBuf;
    fn root(&self) -> &Path;
}

impl PinLayout for Pins {
    fn maps_dir(&self) -> PathBuf {
        Pins::maps_dir(self)
    }
    fn prog(&self, name: &str) -> PathBuf {
        Pins::prog(self, name)
    }
    fn root(&self) -> &Path {
        Pins::root(self)
    }
}

impl PinLayout for StagedPins {
    fn maps_dir(&self) -> PathBuf {
        self.live.maps_dir()
    }
    fn prog(&self, name: &str) -> PathBuf {
        self.progs.join(name)
    }
    fn root(&self) -> &Path {
        &self.progs
    }
}
