//! Validation of new mappings against the table, each other and the host's sockets;
//! selection of mappings by spec.

use std::collections::HashMap;
use std::net::{
    Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6, TcpListener, UdpSocket,
};

use super::{Family, Mapping, PortMapError, PortSpec, Proto, local_addrs_for};

/// Is a host socket bound to the port? Try binding it, as docker does when it holds
/// the port (an IPv6-only mapping tries its IPv6 address: a `[::]` bind also finds
/// dual-stack sockets).
fn check_host_port_free(m: &Mapping) -> Result<(), PortMapError> {
    let addr = if m.family == Family::V6 {
        SocketAddr::V6(SocketAddrV6::new(
            m.host_ip6.unwrap_or(Ipv6Addr::UNSPECIFIED),
            m.host_port,
            0,
            0,
        ))
    } else {
        SocketAddr::V4(SocketAddrV4::new(
            m.host_ip.unwrap_or(Ipv4Addr::UNSPECIFIED),
            m.host_port,
        ))
    };
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
    // Within the batch: two mappings of one port whose addresses overlap in a family
    // (the same one twice, or a wildcard next to an address). Indexed by (proto, port)
    // so 10,000 mappings stay linear.
    let mut batch: HashMap<(Proto, u16), Vec<&Mapping>> = HashMap::new();
    for m in new {
        if m.family == Family::V6 && m.container_ip6.is_none() {
            return Err(PortMapError::NoIpv6 {
                spec: m.describe(),
                container: m.container_id.clone(),
            });
        }
        let same_port = batch.entry((m.proto, m.host_port)).or_default();
        if same_port.iter().any(|o| o.collides(m)) {
            return Err(PortMapError::Duplicate(m.describe()));
        }
        same_port.push(m);
    }
    // Index the table by (proto, port) so 10,000 mappings validate in linear time.
    let mut by_port: HashMap<(Proto, u16), Vec<&Mapping>> = HashMap::new();
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
            if m.forwards_v4() {
                m.forward(&addrs)?;
            }
            m.forward6(&addrs)?;
            check_host_port_free(m)?;
        }
    }
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
                    && t.family == s.family
                    && t.host_ip == s.host_ip
                    && t.host_ip6 == s.host_ip6
                    && container.is_none_or(|c| t.container_id == c)
            });
            match found {
                Some(t) => out.push((*t).clone()),
                None => {
                    let probe = Mapping {
                        container_id: String::new(),
                        container_ip: Ipv4Addr::UNSPECIFIED,
                        proto: s.proto,
                        host_ip: s.host_ip,
                        host_port: port,
                        container_port: 0,
                        runtime_binds: false,
                        family: s.family,
                        host_ip6: s.host_ip6,
                        container_ip6: None,
                    };
                    return Err(PortMapError::NotMapped(probe.describe()));
                }
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::portmap::expand;

    fn spec(s: &str) -> PortSpec {
        s.parse().unwrap()
    }

    #[test]
    fn detects_collisions() {
        let ip = Ipv4Addr::new(172, 19, 0, 2);
        let table = expand("a", ip, None, &[spec("8080:80")]);
        let err = validate(&table, &expand("b", ip, None, &[spec("8080:81")]), false).unwrap_err();
        assert!(
            matches!(err, PortMapError::Collision { ref owner, .. } if owner == "a"),
            "{err}"
        );
        // Same port, other protocol: fine. Specific address vs wildcard: collides.
        validate(
            &table,
            &expand("b", ip, None, &[spec("8080:80/udp")]),
            false,
        )
        .unwrap();
        assert!(
            validate(
                &table,
                &expand("b", ip, None, &[spec("127.0.0.1:8080:80")]),
                false
            )
            .is_err()
        );
        // Two specific addresses do not collide.
        let t2 = expand("a", ip, None, &[spec("127.0.0.1:9090:80")]);
        validate(
            &t2,
            &expand("b", ip, None, &[spec("127.0.0.2:9090:80")]),
            false,
        )
        .unwrap();
        // Duplicates inside one request.
        assert!(matches!(
            validate(
                &[],
                &expand("b", ip, None, &[spec("7000:70"), spec("7000:71")]),
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
            None,
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
            None,
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
    fn selects_and_reports_missing() {
        let ip = Ipv4Addr::new(172, 19, 0, 2);
        let table = expand("a", ip, None, &[spec("8080-8081:80-81")]);
        assert_eq!(select(&table, &[spec("8081:1")], None).unwrap().len(), 1);
        assert!(matches!(
            select(&table, &[spec("9999:1")], None),
            Err(PortMapError::NotMapped(_))
        ));
        assert!(select(&table, &[spec("8080:80")], Some("b")).is_err());
    }
}
