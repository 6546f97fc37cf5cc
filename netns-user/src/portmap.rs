//! Port forwards: the `docker run -p` spec, validation against existing mappings and
//! the host's own sockets, the persisted table, and the datapath's port map.
//!
//! Every change is all-or-nothing: a batch is validated in full before the first map
//! entry is written, and a failed write rolls back what the batch wrote. Conntrack
//! entries that use a mapped host port are flushed when the mapping is added and when
//! it is removed, so a remapped port never keeps delivering stale (UDP) flows.

use std::collections::HashSet;
use std::fmt;
use std::net::{Ipv4Addr, SocketAddrV4, TcpListener, UdpSocket};
use std::str::FromStr;

use netns_common::{CtEntry, CtKey, IPPROTO_TCP, IPPROTO_UDP, PortKey, PortTarget, dir};
use serde::{Deserialize, Serialize};

use crate::datapath::{Datapath, DatapathError, gc::partner_key};
use crate::network::NetworkError;
use crate::network::addrs::LocalAddrs;
use crate::reserve::{self, ReserveError};
use crate::store::Locked;

/// The OCI annotation a container declares its port forwards in: specs separated by
/// commas or whitespace, e.g. `"netns.ports": "8080:80/tcp, 5353:53/udp"`.
pub const ANNOTATION: &str = "netns.ports";

/// File name of the mapping table in the state directory.
pub const TABLE: &str = "ports.json";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Proto {
    Tcp,
    Udp,
}

impl Proto {
    pub fn number(self) -> u8 {
        match self {
            Proto::Tcp => IPPROTO_TCP,
            Proto::Udp => IPPROTO_UDP,
        }
    }
}

impl fmt::Display for Proto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        })
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SpecError {
    #[error("{spec:?}: expected [HOST_IP:]HOST_PORT[-END]:CONTAINER_PORT[-END][/tcp|/udp]")]
    Syntax { spec: String },
    #[error("{spec:?}: unknown protocol {proto:?} (tcp or udp)")]
    Proto { spec: String, proto: String },
    #[error("{spec:?}: port {port:?} is not in 1..65535")]
    Port { spec: String, port: String },
    #[error("{spec:?}: range {range:?} ends before it starts")]
    Range { spec: String, range: String },
    #[error("{spec:?}: host range has {host} ports but container range has {container}")]
    RangeLength {
        spec: String,
        host: u32,
        container: u32,
    },
    #[error("{spec:?}: {ip:?} is not an IPv4 address")]
    HostIp { spec: String, ip: String },
}

/// One `-p` spec: a host port range forwarded one to one to a container port range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortSpec {
    pub host_ip: Option<Ipv4Addr>,
    pub host: (u16, u16),
    pub container: (u16, u16),
    pub proto: Proto,
}

fn parse_range(spec: &str, s: &str) -> Result<(u16, u16), SpecError> {
    let port = |p: &str| -> Result<u16, SpecError> {
        match p.parse::<u32>() {
            Ok(n) if (1..=65535).contains(&n) => Ok(n as u16),
            _ => Err(SpecError::Port {
                spec: spec.into(),
                port: p.into(),
            }),
        }
    };
    match s.split_once('-') {
        None => {
            let p = port(s)?;
            Ok((p, p))
        }
        Some((a, b)) => {
            let (a, b) = (port(a)?, port(b)?);
            if a > b {
                return Err(SpecError::Range {
                    spec: spec.into(),
                    range: s.into(),
                });
            }
            Ok((a, b))
        }
    }
}

impl FromStr for PortSpec {
    type Err = SpecError;
    fn from_str(spec: &str) -> Result<Self, SpecError> {
        let s = spec.trim();
        let (body, proto) = match s.rsplit_once('/') {
            Some((b, p)) => {
                let proto = match p.to_ascii_lowercase().as_str() {
                    "tcp" => Proto::Tcp,
                    "udp" => Proto::Udp,
                    _ => {
                        return Err(SpecError::Proto {
                            spec: spec.into(),
                            proto: p.into(),
                        });
                    }
                };
                (b, proto)
            }
            None => (s, Proto::Tcp),
        };
        let parts: Vec<&str> = body.split(':').collect();
        let (host_ip, host, container) = match parts.as_slice() {
            [h, c] => (None, *h, *c),
            [ip, h, c] => {
                let ip = ip.parse::<Ipv4Addr>().map_err(|_| SpecError::HostIp {
                    spec: spec.into(),
                    ip: (*ip).into(),
                })?;
                (Some(ip).filter(|ip| !ip.is_unspecified()), *h, *c)
            }
            _ => return Err(SpecError::Syntax { spec: spec.into() }),
        };
        if host.is_empty() || container.is_empty() {
            return Err(SpecError::Syntax { spec: spec.into() });
        }
        let host = parse_range(spec, host)?;
        let container = parse_range(spec, container)?;
        let (hn, cn) = (
            u32::from(host.1 - host.0) + 1,
            u32::from(container.1 - container.0) + 1,
        );
        if hn != cn {
            return Err(SpecError::RangeLength {
                spec: spec.into(),
                host: hn,
                container: cn,
            });
        }
        Ok(PortSpec {
            host_ip,
            host,
            container,
            proto,
        })
    }
}

/// Specs from an annotation value: separated by commas or whitespace.
pub fn parse_list(s: &str) -> Result<Vec<PortSpec>, SpecError> {
    s.split(|c: char| c == ',' || c.is_whitespace())
        .filter(|p| !p.is_empty())
        .map(str::parse)
        .collect()
}

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
}

impl Mapping {
    pub fn key(&self) -> PortKey {
        PortKey {
            host_addr: self.host_ip.map_or(0, |a| u32::from(a).to_be()),
            host_port: self.host_port.to_be(),
            proto: self.proto.number(),
            _pad: 0,
        }
    }

    /// The datapath's value, with the interface the host IP is on (see [`LocalAddrs`]).
    pub fn target(&self, addrs: &LocalAddrs) -> Result<PortTarget, PortMapError> {
        let ifindex = addrs.ifindex(self.host_ip).ok_or(PortMapError::NotLocal(
            self.host_ip.unwrap_or(Ipv4Addr::UNSPECIFIED),
        ))?;
        Ok(PortTarget {
            addr: u32::from(self.container_ip).to_be(),
            port: self.container_port.to_be(),
            _pad: [0; 2],
            ifindex,
        })
    }

    /// Same protocol and port on addresses that overlap (a wildcard overlaps all).
    fn collides(&self, o: &Mapping) -> bool {
        self.proto == o.proto
            && self.host_port == o.host_port
            && (self.host_ip.is_none() || o.host_ip.is_none() || self.host_ip == o.host_ip)
    }

    fn describe(&self) -> String {
        match self.host_ip {
            Some(ip) => format!("{ip}:{}/{}", self.host_port, self.proto),
            None => format!("{}/{}", self.host_port, self.proto),
        }
    }
}

/// Expands specs for one container into single-port mappings.
pub fn expand(container_id: &str, container_ip: Ipv4Addr, specs: &[PortSpec]) -> Vec<Mapping> {
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
    #[error(transparent)]
    Network(#[from] NetworkError),
    #[error(transparent)]
    Reserve(#[from] ReserveError),
    #[error(transparent)]
    Datapath(#[from] DatapathError),
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
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
    specs: &[PortSpec],
) -> Result<Vec<Mapping>, PortMapError> {
    let mut table = load_table(lock)?;
    let new = expand(id, ip, specs);
    validate(&table, &new, true)?;
    let before = table.len();
    table.extend(new.iter().cloned());
    reserve::sync(lock, &table)?;
    let undo_reservation = |table: &mut Vec<Mapping>| {
        table.truncate(before);
        if let Err(e) = reserve::sync(lock, table) {
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
        let _ = uninstall(dp, &new);
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
    let gone: HashSet<(Proto, u16, Option<Ipv4Addr>)> = ms
        .iter()
        .map(|m| (m.proto, m.host_port, m.host_ip))
        .collect();
    let mut table = load_table(lock)?;
    table.retain(|t| !gone.contains(&(t.proto, t.host_port, t.host_ip)));
    save_table(lock, &table)?;
    // Released only now that nothing forwards them.
    reserve::sync(lock, &table)?;
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

/// Is a host socket bound to the port? Try binding it, as docker does when it holds
/// the port.
fn check_host_port_free(m: &Mapping) -> Result<(), PortMapError> {
    let addr = SocketAddrV4::new(m.host_ip.unwrap_or(Ipv4Addr::UNSPECIFIED), m.host_port);
    let r = match m.proto {
        Proto::Tcp => TcpListener::bind(addr).map(drop),
        Proto::Udp => UdpSocket::bind(addr).map(drop),
    };
    match r {
        Ok(()) => Ok(()),
        // EADDRNOTAVAIL: the address went away since it was checked to be local; then
        // nothing is bound there, and installing the mapping reports it.
        Err(e) if e.raw_os_error() == Some(libc::EADDRNOTAVAIL) => Ok(()),
        Err(source) => Err(PortMapError::InUse {
            port: m.describe(),
            source,
        }),
    }
}

/// Validates `new` against the table, itself and the host's sockets.
pub fn validate(table: &[Mapping], new: &[Mapping], check_host: bool) -> Result<(), PortMapError> {
    // Within the batch: the same (proto, port, address) twice, or a wildcard next to
    // the same port on one address. Sets keep 10,000 mappings linear.
    let mut seen: HashSet<(Proto, u16, Option<Ipv4Addr>)> = HashSet::new();
    let mut wildcard: HashSet<(Proto, u16)> = HashSet::new();
    let mut specific: HashSet<(Proto, u16)> = HashSet::new();
    for m in new {
        let pp = (m.proto, m.host_port);
        let clash = match m.host_ip {
            None => wildcard.contains(&pp) || specific.contains(&pp),
            Some(_) => wildcard.contains(&pp),
        };
        if clash || !seen.insert((m.proto, m.host_port, m.host_ip)) {
            return Err(PortMapError::Duplicate(m.describe()));
        }
        match m.host_ip {
            None => wildcard.insert(pp),
            Some(_) => specific.insert(pp),
        };
    }
    // Index the table by (proto, port) so 10,000 mappings validate in linear time.
    let mut by_port: std::collections::HashMap<(Proto, u16), Vec<&Mapping>> =
        std::collections::HashMap::new();
    for t in table {
        by_port.entry((t.proto, t.host_port)).or_default().push(t);
    }
    for m in new {
        if let Some(owner) = by_port
            .get(&(m.proto, m.host_port))
            .and_then(|v| v.iter().find(|t| t.collides(m)))
        {
            return Err(PortMapError::Collision {
                new: m.describe(),
                owner: owner.container_id.clone(),
            });
        }
    }
    if check_host {
        let addrs = local_addrs_for(new)?;
        for m in new {
            m.target(&addrs)?;
            check_host_port_free(m)?;
        }
    }
    Ok(())
}

/// The host's addresses, read only when a mapping names a host IP outside 127/8.
pub fn local_addrs_for(ms: &[Mapping]) -> Result<LocalAddrs, PortMapError> {
    if ms
        .iter()
        .all(|m| m.host_ip.is_none_or(|ip| ip.is_loopback()))
    {
        return Ok(LocalAddrs::default());
    }
    Ok(LocalAddrs::read()?)
}

/// The host port (proto, port in network order) a conntrack entry's flow uses, if it
/// is a flow through the uplink or a hairpin: the destination port on the way in, the
/// translated source port on the way out.
fn host_port_of(k: &CtKey, v: &CtEntry) -> (u8, u16) {
    match k.dir {
        dir::UPLINK_INGRESS | dir::BRIDGE => (k.proto, k.tuple.dport),
        _ => (k.proto, v.xlat.sport),
    }
}

/// Deletes every conntrack pair that uses one of the host ports of `ms`: one pass over
/// the table with a set lookup per entry, whatever the number of mappings.
pub fn flush_conntrack(dp: &Datapath, ms: &[Mapping]) -> Result<usize, DatapathError> {
    if ms.is_empty() {
        return Ok(0);
    }
    let ports: HashSet<(u8, u16)> = ms
        .iter()
        .map(|m| (m.proto.number(), m.host_port.to_be()))
        .collect();
    let mut doomed = HashSet::new();
    for (k, v) in dp.conntrack_entries()? {
        if ports.contains(&host_port_of(&k, &v)) {
            doomed.insert(k);
            doomed.insert(partner_key(&k, &v));
        }
    }
    dp.delete_conntrack(&doomed)
}

/// Writes mappings into the datapath; on failure removes what it wrote.
pub fn install(dp: &Datapath, ms: &[Mapping]) -> Result<(), PortMapError> {
    let addrs = local_addrs_for(ms)?;
    let targets: Vec<PortTarget> = ms
        .iter()
        .map(|m| m.target(&addrs))
        .collect::<Result<_, _>>()?;
    let mut map = dp.ports()?;
    for (i, (m, t)) in ms.iter().zip(targets).enumerate() {
        if let Err(e) = map.insert(m.key(), t, 0) {
            for done in &ms[..i] {
                let _ = map.remove(&done.key());
            }
            return Err(DatapathError::Bpf(format!(
                "writing port map entry {}: {e}",
                m.describe()
            ))
            .into());
        }
    }
    flush_conntrack(dp, ms)?;
    Ok(())
}

/// Removes mappings from the datapath (absent entries are fine) and their flows.
pub fn uninstall(dp: &Datapath, ms: &[Mapping]) -> Result<(), PortMapError> {
    let mut map = dp.ports()?;
    for m in ms {
        match map.remove(&m.key()) {
            Ok(()) => {}
            Err(e) if crate::reconcile::map_key_absent(&e) => {}
            Err(e) => {
                return Err(DatapathError::Bpf(format!(
                    "removing port map entry {}: {e}",
                    m.describe()
                ))
                .into());
            }
        }
    }
    flush_conntrack(dp, ms)?;
    Ok(())
}

/// Picks the mappings of `table` that `specs` name (host side), erroring on any that is
/// not mapped. `container`: only that container's.
pub fn select(
    table: &[Mapping],
    specs: &[PortSpec],
    container: Option<&str>,
) -> Result<Vec<Mapping>, PortMapError> {
    let mut out = Vec::new();
    for s in specs {
        for i in 0..=(s.host.1 - s.host.0) {
            let port = s.host.0 + i;
            let found = table.iter().find(|t| {
                t.proto == s.proto
                    && t.host_port == port
                    && t.host_ip == s.host_ip
                    && container.is_none_or(|c| t.container_id == c)
            });
            match found {
                Some(t) => out.push((*t).clone()),
                None => {
                    let d = match s.host_ip {
                        Some(ip) => format!("{ip}:{port}/{}", s.proto),
                        None => format!("{port}/{}", s.proto),
                    };
                    return Err(PortMapError::NotMapped(d));
                }
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(s: &str) -> PortSpec {
        s.parse().unwrap()
    }

    #[test]
    fn parses_docker_specs() {
        assert_eq!(
            spec("8080:80"),
            PortSpec {
                host_ip: None,
                host: (8080, 8080),
                container: (80, 80),
                proto: Proto::Tcp
            }
        );
        assert_eq!(
            spec("127.0.0.1:5353:53/udp"),
            PortSpec {
                host_ip: Some(Ipv4Addr::LOCALHOST),
                host: (5353, 5353),
                container: (53, 53),
                proto: Proto::Udp
            }
        );
        assert_eq!(spec("8000-8010:9000-9010/TCP").host, (8000, 8010));
        assert_eq!(spec("0.0.0.0:1:2").host_ip, None);
    }

    #[test]
    fn rejects_bad_specs() {
        for bad in [
            "80",
            "a:80",
            "0:80",
            "65536:80",
            "80:80/sctp",
            "10-5:10-5",
            "1-3:1-2",
            "x.y:1:2",
            "1:2:3:4",
            ":80",
        ] {
            assert!(bad.parse::<PortSpec>().is_err(), "{bad} should be rejected");
        }
        assert_eq!(
            "8000-8010:9000-9005".parse::<PortSpec>(),
            Err(SpecError::RangeLength {
                spec: "8000-8010:9000-9005".into(),
                host: 11,
                container: 6
            })
        );
    }

    #[test]
    fn expands_ranges_one_to_one() {
        let ms = expand(
            "c",
            Ipv4Addr::new(172, 19, 0, 2),
            &[spec("8000-8002:9000-9002/udp")],
        );
        let pairs: Vec<_> = ms.iter().map(|m| (m.host_port, m.container_port)).collect();
        assert_eq!(pairs, [(8000, 9000), (8001, 9001), (8002, 9002)]);
    }

    #[test]
    fn detects_collisions() {
        let ip = Ipv4Addr::new(172, 19, 0, 2);
        let table = expand("a", ip, &[spec("8080:80")]);
        let err = validate(&table, &expand("b", ip, &[spec("8080:81")]), false).unwrap_err();
        assert!(
            matches!(err, PortMapError::Collision { ref owner, .. } if owner == "a"),
            "{err}"
        );
        // Same port, other protocol: fine. Specific address vs wildcard: collides.
        validate(&table, &expand("b", ip, &[spec("8080:80/udp")]), false).unwrap();
        assert!(
            validate(
                &table,
                &expand("b", ip, &[spec("127.0.0.1:8080:80")]),
                false
            )
            .is_err()
        );
        // Two specific addresses do not collide.
        let t2 = expand("a", ip, &[spec("127.0.0.1:9090:80")]);
        validate(&t2, &expand("b", ip, &[spec("127.0.0.2:9090:80")]), false).unwrap();
        // Duplicates inside one request.
        assert!(matches!(
            validate(
                &[],
                &expand("b", ip, &[spec("7000:70"), spec("7000:71")]),
                false
            ),
            Err(PortMapError::Duplicate(_))
        ));
    }

    #[test]
    fn reports_host_port_in_use() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let ms = expand(
            "c",
            Ipv4Addr::new(172, 19, 0, 2),
            &[spec(&format!("127.0.0.1:{port}:80"))],
        );
        assert!(matches!(
            validate(&[], &ms, true),
            Err(PortMapError::InUse { .. })
        ));
        drop(l);
        validate(&[], &ms, true).unwrap();
    }

    #[test]
    fn refuses_host_ips_that_are_not_local() {
        // 192.0.2.0/24 is TEST-NET-1: never an address of a test machine.
        let ms = expand(
            "c",
            Ipv4Addr::new(172, 19, 0, 2),
            &[spec("192.0.2.77:8080:80")],
        );
        let e = validate(&[], &ms, true).unwrap_err();
        assert!(
            matches!(e, PortMapError::NotLocal(ip) if ip == Ipv4Addr::new(192, 0, 2, 77)),
            "{e}"
        );
        assert_eq!(
            e.to_string(),
            "host IP 192.0.2.77 is not an address of this host"
        );
        // Without the host check (no netlink): accepted.
        validate(&[], &ms, false).unwrap();
    }

    #[test]
    fn targets_carry_the_host_ip_interface() {
        let addrs = LocalAddrs::from_pairs([(5, Ipv4Addr::new(198, 51, 100, 3))]);
        let ip = Ipv4Addr::new(172, 19, 0, 2);
        let t = |s: &str| expand("c", ip, &[spec(s)])[0].target(&addrs);
        let w = t("8080:80").unwrap();
        assert_eq!(
            (w.addr, w.port, w.ifindex),
            (u32::from(ip).to_be(), 80u16.to_be(), 0)
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
    fn selects_and_reports_missing() {
        let ip = Ipv4Addr::new(172, 19, 0, 2);
        let table = expand("a", ip, &[spec("8080-8081:80-81")]);
        assert_eq!(select(&table, &[spec("8081:1")], None).unwrap().len(), 1);
        assert!(matches!(
            select(&table, &[spec("9999:1")], None),
            Err(PortMapError::NotMapped(_))
        ));
        assert!(select(&table, &[spec("8080:80")], Some("b")).is_err());
    }
}
