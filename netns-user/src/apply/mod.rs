//! The state directory is the desired state; [`apply`] makes the datapath follow it.
//!
//! From the leases and the port table it derives what the maps must hold ([`desired`]):
//! for every complete lease its endpoint, its bridge-port entry and, if its veth
//! exists, its port link; for every mapping of a complete lease its port forward, with
//! the interface of its host IP. [`plan`] lists the writes and removals that get there
//! from what the maps hold; apply runs them and makes the reservation of mapped host
//! ports follow the table ([`crate::reserve`]). A second run changes nothing.
//!
//! Owned but left as they are: the entries of an incomplete lease (a prestart that
//! died and whose teardown failed; reconcile retries it) or of a lease without a
//! recorded MAC, and the forward of a mapping whose host IP is not an address of this
//! host right now (nothing can arrive for it).
//!
//! Runs under the state lock: after [`crate::reconcile`] has torn down the leases of
//! containers that are gone, and after a fresh load of the datapath (empty maps).

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr};

use serde::Serialize;

use crate::datapath::{
    BridgePort, Datapath, DatapathError, Endpoint, PortForward, PortForward6, PortForward6Key,
    PortForwardKey,
};
use crate::ipam::{self, IpamError, Lease};
use crate::network::addrs::LocalAddrs;
use crate::network::netlink::parse_mac;
use crate::portmap::{self, Mapping, PortMapError};
use crate::store::Locked;

#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error(transparent)]
    Ipam(#[from] IpamError),
    #[error(transparent)]
    PortMap(#[from] PortMapError),
}

/// Map contents, keyed as the maps are.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Maps {
    pub endpoints: BTreeMap<Ipv4Addr, Endpoint>,
    pub endpoints6: BTreeMap<Ipv6Addr, Endpoint>,
    pub bridge_ports: BTreeMap<u32, BridgePort>,
    pub forwards: BTreeMap<PortForwardKey, PortForward>,
    pub forwards6: BTreeMap<PortForward6Key, PortForward6>,
}

/// What the maps must hold, and what is owned but left as it is.
#[derive(Debug, Default)]
pub struct Desired {
    pub maps: Maps,
    /// Bridge-port ifindex -> the host veth its port link must be on.
    pub port_links: BTreeMap<u32, String>,
    pub keep_ips: HashSet<Ipv4Addr>,
    pub keep_ips6: HashSet<Ipv6Addr>,
    pub keep_forwards: HashSet<PortForwardKey>,
    pub keep_forwards6: HashSet<PortForward6Key>,
}

/// One change to the datapath or the reservation. A plan is a list of them in the
/// order they run; what apply did is the list of those that took effect.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "change", rename_all = "snake_case")]
pub enum Change {
    RemoveForward {
        forward: PortForwardKey,
    },
    RemoveForward6 {
        forward: PortForward6Key,
    },
    RemoveEndpoint {
        ip: Ipv4Addr,
    },
    RemoveEndpoint6 {
        ip: Ipv6Addr,
    },
    RemoveBridgePort {
        ifindex: u32,
    },
    WriteEndpoint {
        ip: Ipv4Addr,
        #[serde(skip)]
        endpoint: Endpoint,
    },
    WriteEndpoint6 {
        ip: Ipv6Addr,
        #[serde(skip)]
        endpoint: Endpoint,
    },
    WriteBridgePort {
        ifindex: u32,
        port: BridgePort,
    },
    WriteForward {
        forward: PortForward,
    },
    WriteForward6 {
        forward: PortForward6,
    },
    AttachPort {
        ifindex: u32,
    },
    ReservePorts {
        ports: String,
    },
    ReleasePorts {
        ports: String,
    },
}

impl fmt::Display for Change {
    /// What the change does and why, as the report and a failure name it.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Change::RemoveForward { forward } => {
                write!(f, "remove port entry {forward} (in no port table)")
            }
            Change::RemoveForward6 { forward } => {
                write!(f, "remove port entry {forward} (in no port table)")
            }
            Change::RemoveEndpoint { ip } => write!(f, "remove endpoint {ip} (no lease)"),
            Change::RemoveEndpoint6 { ip } => write!(f, "remove endpoint {ip} (no lease)"),
            Change::RemoveBridgePort { ifindex: i } => {
                write!(f, "remove bridge port entry of ifindex {i} (no lease)")
            }
            Change::WriteEndpoint { ip, .. } => write!(f, "write endpoint {ip} (missing or stale)"),
            Change::WriteEndpoint6 { ip, .. } => {
                write!(f, "write endpoint {ip} (missing or stale)")
            }
            Change::WriteBridgePort { ifindex: i, .. } => {
                write!(
                    f,
                    "write bridge port entry of ifindex {i} (missing or stale)"
                )
            }
            Change::WriteForward { forward } => {
                write!(f, "write port entry {forward} (missing or stale)")
            }
            Change::WriteForward6 { forward } => {
                write!(f, "write port entry {forward} (missing or stale)")
            }
            Change::AttachPort { ifindex: i } => {
                write!(
                    f,
                    "attach the port program to ifindex {i} (link missing or detached)"
                )
            }
            Change::ReservePorts { ports } => write!(f, "reserve mapped host port(s) {ports}"),
            Change::ReleasePorts { ports } => {
                write!(
                    f,
                    "release reserved host port(s) {ports} (no longer mapped)"
                )
            }
        }
    }
}

/// What [`apply`] did, and what it could not do (each is retried next time).
#[derive(Debug, Default)]
pub struct Applied {
    pub changes: Vec<Change>,
    pub failures: Vec<String>,
}

/// The desired state of `leases` and of the mappings of `table` (whose host IPs are
/// on the interfaces `addrs` gives).
pub fn desired(leases: &BTreeMap<String, Lease>, table: &[Mapping], addrs: &LocalAddrs) -> Desired {
    let mut d = Desired::default();
    for (id, l) in leases {
        match l.mac.as_deref().and_then(parse_mac) {
            Some(mac) if l.complete && l.host_ifindex != 0 => {
                let ep = Endpoint {
                    ifindex: l.host_ifindex,
                    mac,
                    _pad: [0; 2],
                    generation: netns_common::endpoint_generation(id),
                };
                d.maps.endpoints.insert(l.ip, ep);
                if let Some(a) = l.ip6 {
                    d.maps.endpoints6.insert(a, ep);
                }
                d.maps
                    .bridge_ports
                    .insert(l.host_ifindex, BridgePort::of(l.ip, l.ip6, &ep));
                d.port_links.insert(l.host_ifindex, l.host_veth.clone());
            }
            _ => {
                d.keep_ips.insert(l.ip);
                d.keep_ips6.extend(l.ip6);
            }
        }
    }
    for m in table {
        let Some(l) = leases.get(&m.container_id) else {
            continue;
        };
        if m.forwards_v4() {
            match m.forward(addrs) {
                Ok(f) if l.complete => {
                    d.maps.forwards.insert(f.key(), f);
                }
                // Host IP not local now, or its container still being set up or torn
                // down.
                _ => {
                    d.keep_forwards.insert(m.key());
                }
            }
        }
        if m.forwards_v6() {
            match m.forward6(addrs) {
                Ok(Some(f)) if l.complete => {
                    d.maps.forwards6.insert(f.key(), f);
                }
                _ => {
                    d.keep_forwards6.insert(m.key6());
                }
            }
        }
    }
    d
}

/// Keys of `have` that `want` lacks (unless kept), and entries of `want` that `have`
/// lacks or holds otherwise.
fn diff<K: Ord + Copy, V: PartialEq + Copy>(
    want: &BTreeMap<K, V>,
    have: &BTreeMap<K, V>,
    keep: impl Fn(&K, &V) -> bool,
) -> (Vec<K>, Vec<(K, V)>) {
    let gone = have
        .iter()
        .filter(|(k, v)| !want.contains_key(k) && !keep(k, v))
        .map(|(k, _)| *k);
    let new = want.iter().filter(|(k, v)| have.get(k) != Some(v));
    (gone.collect(), new.map(|(k, v)| (*k, *v)).collect())
}

/// The writes and removals that take the maps from `have` to `d`: removals first
/// (nothing is forwarded to a vanishing address), endpoints before their bridge ports.
/// Pure: separated from doing it so it can be tested.
pub fn plan(d: &Desired, have: &Maps) -> Vec<Change> {
    let w = &d.maps;
    let (rm_f, wr_f) = diff(&w.forwards, &have.forwards, |k, _| {
        d.keep_forwards.contains(k)
    });
    let (rm_f6, wr_f6) = diff(&w.forwards6, &have.forwards6, |k, _| {
        d.keep_forwards6.contains(k)
    });
    let (rm_e, wr_e) = diff(&w.endpoints, &have.endpoints, |ip, _| {
        d.keep_ips.contains(ip)
    });
    let (rm_e6, wr_e6) = diff(&w.endpoints6, &have.endpoints6, |ip, _| {
        d.keep_ips6.contains(ip)
    });
    let (rm_b, wr_b) = diff(&w.bridge_ports, &have.bridge_ports, |_, p| {
        d.keep_ips.contains(&p.ip)
    });
    let mut out: Vec<Change> = rm_f
        .into_iter()
        .map(|forward| Change::RemoveForward { forward })
        .collect();
    out.extend(
        rm_f6
            .into_iter()
            .map(|forward| Change::RemoveForward6 { forward }),
    );
    out.extend(rm_e.into_iter().map(|ip| Change::RemoveEndpoint { ip }));
    out.extend(rm_e6.into_iter().map(|ip| Change::RemoveEndpoint6 { ip }));
    out.extend(
        rm_b.into_iter()
            .map(|ifindex| Change::RemoveBridgePort { ifindex }),
    );
    out.extend(
        wr_e.into_iter()
            .map(|(ip, endpoint)| Change::WriteEndpoint { ip, endpoint }),
    );
    out.extend(
        wr_e6
            .into_iter()
            .map(|(ip, endpoint)| Change::WriteEndpoint6 { ip, endpoint }),
    );
    out.extend(
        wr_b.into_iter()
            .map(|(ifindex, port)| Change::WriteBridgePort { ifindex, port }),
    );
    out.extend(
        wr_f.into_iter()
            .map(|(_, forward)| Change::WriteForward { forward }),
    );
    out.extend(
        wr_f6
            .into_iter()
            .map(|(_, forward)| Change::WriteForward6 { forward }),
    );
    out
}

/// Makes the datapath (if loaded) and the reservation of mapped ports follow the state
/// directory. Errors reading the state abort; a failure writing or removing one entry
/// is recorded and the rest goes on.
pub fn apply(lock: &Locked<'_>, dp: Option<&mut Datapath>) -> Result<Applied, ApplyError> {
    let leases = ipam::list(lock)?;
    let table: Vec<Mapping> = portmap::load_table(lock)?
        .into_iter()
        .filter(|m| leases.contains_key(&m.container_id))
        .collect();
    let mut out = Applied::default();
    // The reservation follows the table, also without a datapath.
    match crate::reserve::sync(lock, &portmap::host_ports(&table)) {
        Ok(c) => {
            let ports =
                |s: &crate::network::portset::PortSet| (!s.is_empty()).then(|| s.to_string());
            out.changes
                .extend(ports(&c.reserved).map(|ports| Change::ReservePorts { ports }));
            out.changes
                .extend(ports(&c.released).map(|ports| Change::ReleasePorts { ports }));
        }
        Err(e) => out.failures.push(format!(
            "reserving mapped host ports: {}",
            crate::error_chain(&e)
        )),
    }
    let Some(dp) = dp else {
        return Ok(out);
    };
    let addrs = portmap::local_addrs_for(&table).unwrap_or_else(|e| {
        // Without them, forwards with a host IP are neither written nor removed.
        out.failures.push(format!(
            "reading the host's addresses: {}",
            crate::error_chain(&e)
        ));
        LocalAddrs::default()
    });
    let want = desired(&leases, &table, &addrs);
    let mut todo = match current(dp) {
        Ok(have) => plan(&want, &have),
        Err(e) => {
            out.failures.push(crate::error_chain(&e));
            return Ok(out);
        }
    };
    // Port links of veths that exist (by ifindex and name) but lost their link.
    todo.extend(want.port_links.iter().filter_map(|(i, veth)| {
        let exists =
            nix::net::if_::if_indextoname(*i).is_ok_and(|n| n.to_bytes() == veth.as_bytes());
        (exists && !dp.port_attached(*i)).then_some(Change::AttachPort { ifindex: *i })
    }));
    for c in todo {
        match run(dp, &c) {
            Ok(true) => out.changes.push(c),
            Ok(false) => {}
            Err(e) => out
                .failures
                .push(format!("{c}: {}", crate::error_chain(&e))),
        }
    }
    Ok(out)
}

fn current(dp: &Datapath) -> Result<Maps, DatapathError> {
    Ok(Maps {
        endpoints: dp.endpoints()?.list()?.into_iter().collect(),
        endpoints6: dp.endpoints6()?.list()?.into_iter().collect(),
        bridge_ports: dp.bridge_ports()?.list()?.into_iter().collect(),
        forwards: dp
            .port_forwards()?
            .list()?
            .into_iter()
            .map(|f| (f.key(), f))
            .collect(),
        forwards6: dp
            .port_forwards6()?
            .list()?
            .into_iter()
            .map(|f| (f.key(), f))
            .collect(),
    })
}

/// Does one change; false if there was nothing to remove.
fn run(dp: &mut Datapath, c: &Change) -> Result<bool, DatapathError> {
    let done = |()| true;
    match c {
        Change::RemoveForward { forward } => dp.port_forwards()?.remove(*forward),
        Change::RemoveEndpoint { ip } => dp.retire_endpoint(*ip).map(done),
        Change::RemoveBridgePort { ifindex } => dp.bridge_ports()?.remove(*ifindex),
        Change::WriteEndpoint { ip, endpoint } => dp.endpoints()?.insert(*ip, *endpoint).map(done),
        Change::RemoveEndpoint6 { ip } => dp.endpoints6()?.remove(*ip),
        Change::WriteEndpoint6 { ip, endpoint } => {
            dp.endpoints6()?.insert(*ip, *endpoint).map(done)
        }
        Change::WriteBridgePort { ifindex, port } => {
            dp.bridge_ports()?.insert(*ifindex, *port).map(done)
        }
        Change::WriteForward { forward } => dp.port_forwards()?.insert(forward).map(done),
        Change::RemoveForward6 { forward } => dp.port_forwards6()?.remove(*forward),
        Change::WriteForward6 { forward } => dp.port_forwards6()?.insert(forward).map(done),
        Change::AttachPort { ifindex } => dp.attach_port(*ifindex).map(done),
        Change::ReservePorts { .. } | Change::ReleasePorts { .. } => Ok(true),
    }
}

#[cfg(test)]
mod tests;
