//! Port forwards: the `docker run -p` spec ([`spec`]), validation against existing
//! mappings and the host's own sockets, the persisted table, and the datapath's port map.
//!
//! Every change is all-or-nothing: a batch is validated in full before the first map
//! entry is written, and a failed write rolls back what the batch wrote.
//!
//! Conntrack: removing a mapping leaves the flows that came through it alone, as
//! removing an iptables DNAT rule leaves its conntrack entries: they go on until they
//! end or expire (the datapath expires them by itself), and no new flow is forwarded.
//! So `port rm`, and the removal of a stopped container's mappings, never read the
//! conntrack tables (their cost does not grow with them). Adding a mapping flushes the
//! flows that use its host port, so a port remapped to another container never keeps
//! delivering the old target's (UDP) flows: one bounded pass over the tables
//! (BPF_MAP_LOOKUP_BATCH, see `Datapath::conntrack_entries`). A stopped container's
//! own flows need no flush at all: they are stale once its endpoint is gone.

mod spec;
mod validate;

use std::collections::HashSet;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddrV4, SocketAddrV6};

use serde::{Deserialize, Serialize};

pub use spec::{Family, PortSpec, Proto, SpecError, parse_list};
pub use validate::{select, validate};

use crate::datapath::{
    ConntrackEntry, Datapath, DatapathError, Dir, PortForward, PortForward6, PortForward6Key,
    PortForwardKey,
};
use crate::network::NetworkError;
use crate::network::addrs::LocalAddrs;
use crate::network::portset::PortSet;
use crate::reserve::{self, ReserveError};
use crate::store::Locked;

/// The OCI annotation a container declares its port forwards in: specs separated by
/// commas or whitespace, e.g. `"netns.ports": "8080:80/tcp, 5353:53/udp"`.
pub const ANNOTATION: &str = "netns.ports";

/// File name of the mapping table in the state directory.
pub const TABLE: &str = "ports.json";

/// One forwarded host port.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mapping {
    pub container_id: String,
    pub container_ip: Ipv4Addr,
    pub proto: Proto,
    /// None: every address of the host.
    pub host_ip: Option<Ipv4Addr>,
    pub host_port: u16,
    pub container_port: u16,
    /// The container runtime binds the host port itself (CNI `portMappings`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub runtime_binds: bool,
    /// The families it forwards (mappings made before IPv6 read as `both`: with no
    /// `container_ip6` that is IPv4 only).
    #[serde(default)]
    pub family: Family,
    /// The IPv6 host address of a `v6` mapping (None: `[::]`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_ip6: Option<Ipv6Addr>,
    /// The container's IPv6 address, the target of the IPv6 side.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container_ip6: Option<Ipv6Addr>,
}

/// What identifies a mapping in the table: its host side in every family.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct MappingKey {
    pub family: Family,
    pub host_ip: Option<Ipv4Addr>,
    pub host_ip6: Option<Ipv6Addr>,
    pub host_port: u16,
    pub proto: Proto,
}

impl Mapping {
    pub fn ident(&self) -> MappingKey {
        MappingKey {
            family: self.family,
            host_ip: self.host_ip,
            host_ip6: self.host_ip6,
            host_port: self.host_port,
            proto: self.proto,
        }
    }

    /// Whether it has an IPv4 entry in the datapath.
    pub fn forwards_v4(&self) -> bool {
        self.family.v4()
    }

    /// Whether it has an IPv6 entry in the datapath.
    pub fn forwards_v6(&self) -> bool {
        self.family.v6() && self.container_ip6.is_some()
    }

    /// The host side of the IPv6 entry.
    pub fn key6(&self) -> PortForward6Key {
        PortForward6Key {
            host_ip: self.host_ip6,
            host_port: self.host_port,
            proto: self.proto,
        }
    }

    /// The datapath's IPv6 entry (None: the mapping has none).
    pub fn forward6(&self, addrs: &LocalAddrs) -> Result<Option<PortForward6>, PortMapError> {
        let Some(ip6) = self.container_ip6.filter(|_| self.family.v6()) else {
            return Ok(None);
        };
        let ifindex = addrs
            .ifindex6(self.host_ip6)
            .ok_or(PortMapError::NotLocal6(
                self.host_ip6.unwrap_or(Ipv6Addr::UNSPECIFIED),
            ))?;
        Ok(Some(PortForward6 {
            host_ip: self.host_ip6,
            host_port: self.host_port,
            proto: self.proto,
            target: SocketAddrV6::new(ip6, self.container_port, 0, 0),
            ifindex,
            runtime_binds: self.runtime_binds,
        }))
    }

    /// The host side, which identifies the datapath's IPv4 entry.
    pub fn key(&self) -> PortForwardKey {
        PortForwardKey {
            host_ip: self.host_ip,
            host_port: self.host_port,
            proto: self.proto,
        }
    }

    /// The datapath's entry, with the interface the host IP is on (see [`LocalAddrs`]).
    pub fn forward(&self, addrs: &LocalAddrs) -> Result<PortForward, PortMapError> {
        let ifindex = addrs.ifindex(self.host_ip).ok_or(PortMapError::NotLocal(
            self.host_ip.unwrap_or(Ipv4Addr::UNSPECIFIED),
        ))?;
        Ok(PortForward {
            host_ip: self.host_ip,
            host_port: self.host_port,
            proto: self.proto,
            target: SocketAddrV4::new(self.container_ip, self.container_port),
            ifindex,
            runtime_binds: self.runtime_binds,
        })
    }

    /// Same protocol and port on addresses that overlap in a family both forward (a
    /// wildcard overlaps all of its family).
    pub(super) fn collides(&self, o: &Mapping) -> bool {
        fn overlap<T: PartialEq>(a: Option<T>, b: Option<T>) -> bool {
            a.is_none() || b.is_none() || a == b
        }
        self.proto == o.proto
            && self.host_port == o.host_port
            && ((self.family.v4() && o.family.v4() && overlap(self.host_ip, o.host_ip))
                || (self.family.v6() && o.family.v6() && overlap(self.host_ip6, o.host_ip6)))
    }

    /// The host side as a spec writes it.
    pub fn describe(&self) -> String {
        format!("{}/{}", self.host(), self.proto)
    }

    /// `ADDR:PORT` of the host side (`[::]:PORT`, `0.0.0.0:PORT`, or `PORT` for both).
    pub fn host(&self) -> String {
        match (self.family, self.host_ip, self.host_ip6) {
            (Family::V6, _, ip6) => {
                format!(
                    "[{}]:{}",
                    ip6.unwrap_or(Ipv6Addr::UNSPECIFIED),
                    self.host_port
                )
            }
            (Family::V4, ip, _) => {
                format!("{}:{}", ip.unwrap_or(Ipv4Addr::UNSPECIFIED), self.host_port)
            }
            (Family::Both, _, _) => self.host_port.to_string(),
        }
    }
}

/// Expands specs for one container (with `container_ip6` when it has IPv6) into
/// single-port mappings.
pub fn expand(
    container_id: &str,
    container_ip: Ipv4Addr,
    container_ip6: Option<Ipv6Addr>,
    specs: &[PortSpec],
) -> Vec<Mapping> {
    let mut out = Vec::new();
    for s in specs {
        for i in 0..=(s.host.1 - s.host.0) {
            out.push(Mapping {
                container_id: container_id.to_owned(),
                container_ip,
                proto: s.proto,
                host_ip: s.host_ip,
                host_port: s.host.0 + i,
                container_port: s.container.0 + i,
                runtime_binds: s.runtime_binds,
                family: s.family,
                host_ip6: s.host_ip6,
                container_ip6,
            });
        }
    }
    out
}

#[derive(Debug, thiserror::Error)]
pub enum PortMapError {
    #[error("host port {new} is already mapped to container {owner}")]
    Collision { new: String, owner: String },
    #[error("host port {0} appears twice in this request")]
    Duplicate(String),
    #[error("host port {port} is already in use on the host ({source})")]
    InUse {
        port: String,
        #[source]
        source: std::io::Error,
    },
    #[error("no mapping of host port {0}")]
    NotMapped(String),
    #[error("host IP {0} is not an address of this host")]
    NotLocal(Ipv4Addr),
    #[error("host IP {0} is not an address of this host")]
    NotLocal6(Ipv6Addr),
    #[error(
        "{spec} is an IPv6 forward but container {container} has no IPv6 address (start it with --ip6)"
    )]
    NoIpv6 { spec: String, container: String },
    #[error(transparent)]
    Network(#[from] NetworkError),
    #[error(transparent)]
    Reserve(#[from] ReserveError),
    #[error(transparent)]
    Datapath(#[from] DatapathError),
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
}

/// The host ports of a port table (what [`reserve`] keeps reserved).
pub fn host_ports(table: &[Mapping]) -> PortSet {
    table.iter().map(|m| m.host_port).collect()
}

/// The persisted mappings (all containers).
pub fn load_table(lock: &Locked<'_>) -> Result<Vec<Mapping>, PortMapError> {
    Ok(lock.read(TABLE)?.unwrap_or_default())
}

fn save_table(lock: &Locked<'_>, t: &[Mapping]) -> Result<(), PortMapError> {
    Ok(lock.write(TABLE, &t)?)
}

/// Validates, installs and records a container's forwards, all or nothing. The host
/// ports are reserved ([`reserve`]) before the datapath forwards them, so the kernel
/// can no longer hand one out as an ephemeral port once they are live.
pub fn add(
    lock: &Locked<'_>,
    dp: &Datapath,
    id: &str,
    ip: Ipv4Addr,
    ip6: Option<Ipv6Addr>,
    specs: &[PortSpec],
) -> Result<Vec<Mapping>, PortMapError> {
    let mut table = load_table(lock)?;
    let new = expand(id, ip, ip6, specs);
    validate(&table, &new, true)?;
    let before = table.len();
    table.extend(new.iter().cloned());
    reserve::sync(lock, &host_ports(&table))?;
    let undo_reservation = |table: &mut Vec<Mapping>| {
        table.truncate(before);
        if let Err(e) = reserve::sync(lock, &host_ports(table)) {
            log::warn!(
                "releasing the reservation of unmapped ports failed (retried at the next sync): {}",
                crate::error_chain(&e)
            );
        }
    };
    if let Err(e) = install(dp, &new) {
        undo_reservation(&mut table);
        return Err(e);
    }
    if let Err(e) = save_table(lock, &table) {
        if let Err(u) = uninstall(dp, &new) {
            log::warn!(
                "port forwards left in the datapath after a failed table write (reconcile \
                 removes them): {}",
                crate::error_chain(&u)
            );
        }
        undo_reservation(&mut table);
        return Err(e);
    }
    Ok(new)
}

/// Uninstalls and forgets mappings.
pub fn remove(
    lock: &Locked<'_>,
    dp: Option<&Datapath>,
    ms: &[Mapping],
) -> Result<(), PortMapError> {
    if let Some(dp) = dp {
        uninstall(dp, ms)?;
    }
    let gone: HashSet<MappingKey> = ms.iter().map(Mapping::ident).collect();
    let mut table = load_table(lock)?;
    table.retain(|t| !gone.contains(&t.ident()));
    save_table(lock, &table)?;
    // Released only now that nothing forwards them.
    reserve::sync(lock, &host_ports(&table))?;
    Ok(())
}

/// Removes every forward of a container; returns how many.
pub fn remove_container(
    lock: &Locked<'_>,
    dp: Option<&Datapath>,
    id: &str,
) -> Result<usize, PortMapError> {
    let mine: Vec<Mapping> = load_table(lock)?
        .into_iter()
        .filter(|m| m.container_id == id)
        .collect();
    if !mine.is_empty() {
        remove(lock, dp, &mine)?;
    }
    Ok(mine.len())
}

/// The container IPv6 address to validate specs with before the container has one:
/// any address when `--ip6` is on (so `[::]` specs pass), None when it is off.
pub fn unspecified6(cfg: &crate::config::NetConfig) -> Option<Ipv6Addr> {
    cfg.gateway6.map(|_| Ipv6Addr::UNSPECIFIED)
}

/// The host's addresses, read only when a mapping names a host IP outside 127/8
/// and `::1`.
pub fn local_addrs_for(ms: &[Mapping]) -> Result<LocalAddrs, PortMapError> {
    if ms.iter().all(|m| {
        m.host_ip.is_none_or(|ip| ip.is_loopback()) && m.host_ip6.is_none_or(|ip| ip.is_loopback())
    }) {
        return Ok(LocalAddrs::default());
    }
    Ok(LocalAddrs::read()?)
}

/// The host port (proto, port) a conntrack entry's flow uses, if it is a flow through
/// the uplink or a hairpin: the destination port on the way in, the translated source
/// port on the way out.
fn host_port_of(e: &ConntrackEntry) -> (u8, u16) {
    match e.key.dir {
        Dir::UplinkIngress | Dir::Bridge => (e.key.proto, e.key.tuple.dst.port()),
        Dir::UplinkEgress => (e.key.proto, e.xlat.src.port()),
    }
}

/// Deletes every conntrack pair that uses one of the host ports of `ms`, with its
/// copies: one pass over each table (a batch walk, which ends after one pass over the
/// buckets whatever the traffic does meanwhile) with a set lookup per entry, whatever
/// the number of mappings.
pub fn flush_conntrack(dp: &Datapath, ms: &[Mapping]) -> Result<usize, DatapathError> {
    if ms.is_empty() {
        return Ok(0);
    }
    let ports: HashSet<(u8, u16)> = ms.iter().map(|m| (m.proto.number(), m.host_port)).collect();
    let mut doomed = HashSet::new();
    for e in dp.conntrack_entries()? {
        if ports.contains(&host_port_of(&e)) {
            doomed.insert(e.key);
            doomed.insert(e.partner_key());
        }
    }
    dp.delete_conntrack(&doomed)
}

/// Writes mappings into the datapath (each family's entry); on failure removes what
/// it wrote.
pub fn install(dp: &Datapath, ms: &[Mapping]) -> Result<(), PortMapError> {
    let addrs = local_addrs_for(ms)?;
    let mut forwards: Vec<PortForward> = Vec::new();
    let mut forwards6: Vec<PortForward6> = Vec::new();
    for m in ms {
        if m.forwards_v4() {
            forwards.push(m.forward(&addrs)?);
        }
        forwards6.extend(m.forward6(&addrs)?);
    }
    let mut map = dp.port_forwards()?;
    let mut map6 = dp.port_forwards6()?;
    let mut written = (0, 0);
    let mut r = Ok(());
    for f in &forwards {
        r = map.insert(f);
        if r.is_err() {
            break;
        }
        written.0 += 1;
    }
    if r.is_ok() {
        for f in &forwards6 {
            r = map6.insert(f);
            if r.is_err() {
                break;
            }
            written.1 += 1;
        }
    }
    if let Err(e) = r {
        for done in &forwards[..written.0] {
            if let Err(u) = map.remove(done.key()) {
                log::warn!(
                    "rolling back port forward {done}: {}",
                    crate::error_chain(&u)
                );
            }
        }
        for done in &forwards6[..written.1] {
            if let Err(u) = map6.remove(done.key()) {
                log::warn!(
                    "rolling back port forward {done}: {}",
                    crate::error_chain(&u)
                );
            }
        }
        return Err(e.into());
    }
    flush_conntrack(dp, ms)?;
    Ok(())
}

/// Removes mappings from the datapath (absent entries are fine). Flows that came
/// through them are left to end or expire (see the module documentation): no
/// conntrack walk.
pub fn uninstall(dp: &Datapath, ms: &[Mapping]) -> Result<(), PortMapError> {
    let mut map = dp.port_forwards()?;
    let mut map6 = dp.port_forwards6()?;
    for m in ms {
        if m.forwards_v4() {
            map.remove(m.key())?;
        }
        if m.forwards_v6() {
            map6.remove(m.key6())?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(s: &str) -> PortSpec {
        s.parse().unwrap()
    }

    #[test]
    fn expands_ranges_one_to_one() {
        let ms = expand(
            "c",
            Ipv4Addr::new(172, 19, 0, 2),
            None,
            &[spec("8000-8002:9000-9002/udp")],
        );
        let pairs: Vec<_> = ms.iter().map(|m| (m.host_port, m.container_port)).collect();
        assert_eq!(pairs, [(8000, 9000), (8001, 9001), (8002, 9002)]);
    }

    #[test]
    fn targets_carry_the_host_ip_interface() {
        let addrs = LocalAddrs::from_pairs([(5, Ipv4Addr::new(198, 51, 100, 3))]);
        let ip = Ipv4Addr::new(172, 19, 0, 2);
        let t = |s: &str| expand("c", ip, None, &[spec(s)])[0].forward(&addrs);
        let w = t("8080:80").unwrap();
        assert_eq!(
            (w.target, w.ifindex, w.host_port),
            (SocketAddrV4::new(ip, 80), 0, 8080)
        );
        assert_eq!(
            t("127.0.0.1:8080:80").unwrap().ifindex,
            netns_common::LOOPBACK_IFINDEX
        );
        assert_eq!(t("198.51.100.3:8080:80").unwrap().ifindex, 5);
        assert!(matches!(
            t("198.51.100.4:8080:80"),
            Err(PortMapError::NotLocal(_))
        ));
    }

    #[test]
    fn ipv6_sides_and_families() {
        let mut addrs = LocalAddrs::from_pairs([(5, Ipv4Addr::new(198, 51, 100, 3))]);
        let up: Ipv6Addr = "2001:db8:100::2".parse().unwrap();
        addrs.add_ipv6([(5, up)]);
        let ip = Ipv4Addr::new(172, 19, 0, 2);
        let ip6: Ipv6Addr = "fd00:19::2".parse().unwrap();
        let m = |s: &str| expand("c", ip, Some(ip6), &[spec(s)]).remove(0);
        // No host IP: both families.
        let both = m("8080:80");
        assert!(both.forwards_v4() && both.forwards_v6());
        let f6 = both.forward6(&addrs).unwrap().unwrap();
        assert_eq!(
            (f6.host_ip, f6.ifindex, f6.target),
            (None, 0, SocketAddrV6::new(ip6, 80, 0, 0))
        );
        // Without IPv6 in the container, the same spec is IPv4 only.
        let v4_only = expand("c", ip, None, &[spec("8080:80")]).remove(0);
        assert!(v4_only.forwards_v4() && !v4_only.forwards_v6());
        assert_eq!(v4_only.forward6(&addrs).unwrap(), None);
        let any6 = m("[::]:8080:80");
        assert!(!any6.forwards_v4() && any6.forwards_v6());
        assert_eq!(any6.describe(), "[::]:8080/tcp");
        assert_eq!(
            m("[::1]:8080:80")
                .forward6(&addrs)
                .unwrap()
                .unwrap()
                .ifindex,
            netns_common::LOOPBACK_IFINDEX
        );
        assert_eq!(
            m("[2001:db8:100::2]:8080:80")
                .forward6(&addrs)
                .unwrap()
                .unwrap()
                .ifindex,
            5
        );
        assert!(matches!(
            m("[2001:db8:100::9]:8080:80").forward6(&addrs),
            Err(PortMapError::NotLocal6(_))
        ));
        // Collisions by family: [::] and 0.0.0.0 on one port coexist, both collide with each.
        let v4 = m("0.0.0.0:8080:80");
        assert!(!any6.collides(&v4) && !v4.collides(&any6));
        assert!(both.collides(&any6) && both.collides(&v4));
        assert!(any6.collides(&m("[2001:db8:100::2]:8080:80")));
        assert_ne!(any6.ident(), v4.ident());
    }
}
