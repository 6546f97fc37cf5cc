//! The `docker run -p` syntax: `[HOST_IP:]HOST_PORT[-END]:CONTAINER_PORT[-END][/tcp|/udp]`,
//! an IPv6 host IP in brackets (`[::]:8080:80`, `[2001:db8::1]:8080:80/udp`). Without
//! a host IP a spec forwards both families (IPv6 when the container has an address);
//! `0.0.0.0` is every IPv4 address only, `[::]` every IPv6 address only.

use std::net::{Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

use serde::{Deserialize, Serialize};

pub use crate::datapath::Proto;

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
    #[error("{spec:?}: {ip:?} is not an IP address (IPv6 in brackets: [::1]:8080:80)")]
    HostIp { spec: String, ip: String },
}

/// Which address families a mapping forwards.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default, Serialize, Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Family {
    /// No host IP given: IPv4, and IPv6 when the container has an IPv6 address.
    #[default]
    Both,
    V4,
    V6,
}

impl Family {
    pub fn v4(self) -> bool {
        self != Family::V6
    }
    pub fn v6(self) -> bool {
        self != Family::V4
    }
}

/// One `-p` spec: a host port range forwarded one to one to a container port range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortSpec {
    pub family: Family,
    /// The IPv4 host address (None: every address).
    pub host_ip: Option<Ipv4Addr>,
    /// The IPv6 host address of a [`Family::V6`] spec (None: `[::]`).
    pub host_ip6: Option<Ipv6Addr>,
    pub host: (u16, u16),
    pub container: (u16, u16),
    pub proto: Proto,
    /// The container runtime holds the host port itself (a CNI runtime's
    /// `portMappings`): its bind of the port is let through.
    pub runtime_binds: bool,
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
                let proto = netns_common::proto_number(p)
                    .and_then(Proto::from_number)
                    .ok_or_else(|| SpecError::Proto {
                        spec: spec.into(),
                        proto: p.into(),
                    })?;
                (b, proto)
            }
            None => (s, Proto::Tcp),
        };
        let host_ip_err = |ip: &str| SpecError::HostIp {
            spec: spec.into(),
            ip: ip.into(),
        };
        let (family, host_ip, host_ip6, ports) = if let Some(rest) = body.strip_prefix('[') {
            let (ip, ports) = rest
                .split_once("]:")
                .ok_or_else(|| SpecError::Syntax { spec: spec.into() })?;
            let ip6 = ip.parse::<Ipv6Addr>().map_err(|_| host_ip_err(ip))?;
            if ip6.to_ipv4_mapped().is_some() {
                return Err(host_ip_err(ip));
            }
            (
                Family::V6,
                None,
                Some(ip6).filter(|a| !a.is_unspecified()),
                ports,
            )
        } else {
            match body.matches(':').count() {
                1 => (Family::Both, None, None, body),
                2 => {
                    let (ip, ports) = body.split_once(':').expect("two colons");
                    let ip4 = ip.parse::<Ipv4Addr>().map_err(|_| host_ip_err(ip))?;
                    (
                        Family::V4,
                        Some(ip4).filter(|ip| !ip.is_unspecified()),
                        None,
                        ports,
                    )
                }
                // An IPv6 address without brackets.
                n if n > 2
                    && body
                        .rsplitn(3, ':')
                        .nth(2)
                        .is_some_and(|ip| ip.parse::<Ipv6Addr>().is_ok()) =>
                {
                    let ip = body.rsplitn(3, ':').nth(2).unwrap_or_default();
                    return Err(host_ip_err(ip));
                }
                _ => return Err(SpecError::Syntax { spec: spec.into() }),
            }
        };
        let (host, container) = ports
            .split_once(':')
            .filter(|(_, c)| !c.contains(':'))
            .ok_or_else(|| SpecError::Syntax { spec: spec.into() })?;
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
            family,
            host_ip,
            host_ip6,
            host,
            container,
            proto,
            runtime_binds: false,
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
                family: Family::Both,
                host_ip: None,
                host_ip6: None,
                host: (8080, 8080),
                container: (80, 80),
                proto: Proto::Tcp,
                runtime_binds: false,
            }
        );
        assert_eq!(
            spec("127.0.0.1:5353:53/udp"),
            PortSpec {
                family: Family::V4,
                host_ip: Some(Ipv4Addr::LOCALHOST),
                host_ip6: None,
                host: (5353, 5353),
                container: (53, 53),
                proto: Proto::Udp,
                runtime_binds: false,
            }
        );
        assert_eq!(spec("8000-8010:9000-9010/TCP").host, (8000, 8010));
        assert_eq!(spec("0.0.0.0:1:2").host_ip, None);
        assert_eq!(spec("0.0.0.0:1:2").family, Family::V4);
        let any6 = spec("[::]:8080:80");
        assert_eq!(
            (
                any6.family,
                any6.host_ip,
                any6.host_ip6,
                any6.host,
                any6.container
            ),
            (Family::V6, None, None, (8080, 8080), (80, 80))
        );
        let one6 = spec("[2001:db8:100::2]:8080-8081:80-81/udp");
        assert_eq!(one6.host_ip6, Some("2001:db8:100::2".parse().unwrap()));
        assert_eq!((one6.proto, one6.host), (Proto::Udp, (8080, 8081)));
        assert_eq!(spec("[::1]:53:53/udp").host_ip6, Some(Ipv6Addr::LOCALHOST));
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
            "[::1:80:80",
            "[::1]80:80",
            "[::ffff:1.2.3.4]:80:80",
            "[x]:80:80",
            "[::]:80",
            "[::]:80:80:80",
        ] {
            assert!(bad.parse::<PortSpec>().is_err(), "{bad} should be rejected");
        }
        // An IPv6 host IP without brackets is named as such.
        assert_eq!(
            "::1:8080:80".parse::<PortSpec>(),
            Err(SpecError::HostIp {
                spec: "::1:8080:80".into(),
                ip: "::1".into()
            })
        );
        assert_eq!(
            "8000-8010:9000-9005".parse::<PortSpec>(),
            Err(SpecError::RangeLength {
                spec: "8000-8010:9000-9005".into(),
                host: 11,
                container: 6
            })
        );
    }
}
