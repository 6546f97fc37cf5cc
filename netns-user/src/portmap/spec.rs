//! The `docker run -p` syntax: `[HOST_IP:]HOST_PORT[-END]:CONTAINER_PORT[-END][/tcp|/udp]`.

use std::net::Ipv4Addr;
use std::str::FromStr;

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
                host_ip: None,
                host: (8080, 8080),
                container: (80, 80),
                proto: Proto::Tcp,
                runtime_binds: false,
            }
        );
        assert_eq!(
            spec("127.0.0.1:5353:53/udp"),
            PortSpec {
                host_ip: Some(Ipv4Addr::LOCALHOST),
                host: (5353, 5353),
                container: (53, 53),
                proto: Proto::Udp,
                runtime_binds: false,
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
}
