//! The typed configuration of the domain code: what the container service, the host
//! side and the datapath need, free of clap. `cli` parses flags into these types and
//! builds a [`NetConfig`]; nothing below the command layer sees clap.

use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::PathBuf;
use std::str::FromStr;

/// iproute2 keeps named network namespaces here; our state must never live there.
pub const IPROUTE2_NETNS_DIR: &str = "/run/netns";

/// The container's interface name unless a CNI runtime names another.
pub const DEFAULT_IFNAME: &str = "eth0";

/// What every container's network is made from (the global flags, typed).
#[derive(Debug, Clone)]
pub struct NetConfig {
    pub bridge: String,
    /// The bridge's gateway address and the subnet's prefix length.
    pub gateway: Gateway,
    /// `--ip6`: the bridge's IPv6 gateway and the containers' prefix (None: IPv4 only).
    pub gateway6: Option<Gateway6>,
    /// MTU of bridge and veths; None: the uplink's.
    pub mtu: Option<u32>,
    /// Where masqueraded traffic leaves; None: the device of the default route.
    pub uplink: Option<String>,
    pub state_dir: PathBuf,
    /// Base bpffs directory; pins live in `<bpffs_dir>/v<LAYOUT_VERSION>`.
    pub bpffs_dir: PathBuf,
    pub nat_ports: PortRange,
    /// cgroup v2 directory of the socket programs: "auto", "none" or a path.
    pub cgroup: String,
    /// Conntrack table size when the datapath is first loaded.
    pub ct_max: Option<u32>,
    /// Translated packets bypass the host stack (bridge, forwarding, netfilter).
    pub fast_path: bool,
    /// Conntrack entries count packets and bytes.
    pub ct_counters: bool,
    /// Conntrack flows per container (None: a quarter of the table size, 0: no limit).
    pub ct_max_per_container: Option<u32>,
    /// Sources that may reach container addresses directly (routed setups).
    pub allow_inbound: Vec<Cidr>,
    /// Destinations container flows reach with their own address (no masquerade).
    pub no_masquerade: Vec<Cidr>,
}

/// Errors of flag validation (shown by clap next to the offending flag).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ArgError {
    #[error("interface name must be 1 to 15 bytes, got {0}")]
    IfnameLength(usize),
    #[error("interface name must not contain '/', ':' or whitespace")]
    IfnameChars,
    #[error("expected ADDRESS/PREFIX such as 172.19.0.1/16")]
    CidrSyntax,
    #[error(
        "prefix length {0} is out of range: the subnet needs room for a gateway and containers (1..=30)"
    )]
    Prefix(u8),
    #[error("{0} is the network address of its subnet, not a usable gateway")]
    NetworkAddress(Ipv4Addr),
    #[error("{0} is the broadcast address of its subnet, not a usable gateway")]
    BroadcastAddress(Ipv4Addr),
    #[error("expected MIN-MAX with 1 <= MIN <= MAX <= 65535, such as 32768-60999")]
    PortRange,
    #[error(
        "{0} is (or is inside) iproute2's named-namespace directory {IPROUTE2_NETNS_DIR}; choose another state directory"
    )]
    StateDirIsNetnsDir(PathBuf),
    #[error("state directory must be an absolute path")]
    StateDirRelative,
    #[error("{0:?}: expected an IPv4 CIDR such as 10.0.0.0/8 (or an address)")]
    InboundSyntax(String),
    #[error("{0:?}: prefix length must be 0 to 32")]
    InboundPrefix(String),
    #[error("{0:?}: expected an IPv6 ADDRESS/PREFIX such as fd00:19::1/64")]
    Cidr6Syntax(String),
    #[error(
        "{0:?}: prefix length must be 8 to 120 (the prefix needs room for the containers' addresses)"
    )]
    Prefix6(String),
    #[error(
        "{0:?}: the gateway must be a unicast address with host bits set (not the prefix itself, not multicast, not link-local, not an IPv4-mapped address)"
    )]
    Gateway6Address(String),
}

/// Why `--ip6` does not fit the IPv4 subnet (the IPv6 address of a container is the
/// prefix plus its IPv4 host offset, so every IPv4 host needs room).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Ip6Error {
    #[error(
        "--ip6 {gw6}: a /{} leaves {} host bits, but the IPv4 subnet {} has {}; use a /{} or shorter prefix",
        gw6.prefix_len,
        128 - u32::from(gw6.prefix_len),
        v4.subnet(),
        32 - u32::from(v4.prefix_len),
        96 + u32::from(v4.prefix_len)
    )]
    TooSmall { gw6: Gateway6, v4: Gateway },
    #[error(
        "--ip6 {gw6}: the gateway's host part would be the address of the container at {clash}; use the IPv4 gateway's offset (e.g. {suggest})"
    )]
    GatewayClash {
        gw6: Gateway6,
        clash: Ipv4Addr,
        suggest: Ipv6Addr,
    },
}

/// The bridge's gateway address and the subnet's prefix length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gateway {
    pub addr: Ipv4Addr,
    pub prefix_len: u8,
}

impl Gateway {
    pub fn mask(self) -> u32 {
        u32::MAX
            .checked_shl(32 - u32::from(self.prefix_len))
            .unwrap_or(0)
    }
    pub fn network(self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.addr) & self.mask())
    }
    pub fn broadcast(self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.addr) | !self.mask())
    }
    /// The subnet as `a.b.c.d/n`.
    pub fn subnet(self) -> String {
        format!("{}/{}", self.network(), self.prefix_len)
    }
}

impl FromStr for Gateway {
    type Err = ArgError;
    fn from_str(s: &str) -> Result<Self, ArgError> {
        let (a, p) = s.split_once('/').ok_or(ArgError::CidrSyntax)?;
        let addr: Ipv4Addr = a.parse().map_err(|_| ArgError::CidrSyntax)?;
        let prefix_len: u8 = p.parse().map_err(|_| ArgError::CidrSyntax)?;
        if !(1..=30).contains(&prefix_len) {
            return Err(ArgError::Prefix(prefix_len));
        }
        let gw = Gateway { addr, prefix_len };
        if addr == gw.network() {
            return Err(ArgError::NetworkAddress(addr));
        }
        if addr == gw.broadcast() {
            return Err(ArgError::BroadcastAddress(addr));
        }
        Ok(gw)
    }
}

impl fmt::Display for Gateway {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix_len)
    }
}

/// The bridge's IPv6 gateway address and the containers' prefix length (`--ip6`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gateway6 {
    pub addr: Ipv6Addr,
    pub prefix_len: u8,
}

impl Gateway6 {
    pub fn mask(self) -> u128 {
        u128::MAX
            .checked_shl(128 - u32::from(self.prefix_len))
            .unwrap_or(0)
    }
    pub fn network(self) -> Ipv6Addr {
        Ipv6Addr::from(u128::from(self.addr) & self.mask())
    }

    /// The container address of IPv4 `ip` in `gw`'s subnet: this prefix plus the same
    /// host offset (172.19.0.5/16 -> fd00:19::5/64), so the IPv4 lease decides both.
    pub fn host_for(self, gw: Gateway, ip: Ipv4Addr) -> Ipv6Addr {
        let offset = u32::from(ip) & !gw.mask();
        Ipv6Addr::from(u128::from(self.network()) | u128::from(offset))
    }

    /// Whether every IPv4 host offset of `gw` fits, and no container gets the gateway's
    /// own address.
    pub fn check_fits(self, gw: Gateway) -> Result<(), Ip6Error> {
        let host4 = 32 - u32::from(gw.prefix_len);
        let host6 = 128 - u32::from(self.prefix_len);
        if host6 < host4 {
            return Err(Ip6Error::TooSmall { gw6: self, v4: gw });
        }
        let host = u128::from(self.addr) & !self.mask();
        let gw_offset = u128::from(u32::from(gw.addr) & !gw.mask());
        let max_offset = u128::from(!gw.mask());
        // Offsets 0 and all-ones are IPv4's network and broadcast: never a container.
        if host != gw_offset && host > 0 && host < max_offset {
            return Err(Ip6Error::GatewayClash {
                gw6: self,
                clash: Ipv4Addr::from(u32::from(gw.network()) | host as u32),
                suggest: Ipv6Addr::from(u128::from(self.network()) | gw_offset),
            });
        }
        Ok(())
    }
}

impl FromStr for Gateway6 {
    type Err = ArgError;
    fn from_str(s: &str) -> Result<Self, ArgError> {
        let syntax = || ArgError::Cidr6Syntax(s.to_owned());
        let (a, p) = s.trim().split_once('/').ok_or_else(syntax)?;
        let addr: Ipv6Addr = a.parse().map_err(|_| syntax())?;
        let prefix_len: u8 = p.parse().map_err(|_| syntax())?;
        if !(8..=120).contains(&prefix_len) {
            return Err(ArgError::Prefix6(s.to_owned()));
        }
        let gw = Gateway6 { addr, prefix_len };
        let link_local = addr.segments()[0] & 0xffc0 == 0xfe80;
        if addr == gw.network()
            || addr.is_multicast()
            || addr.is_loopback()
            || addr.is_unspecified()
            || link_local
            || addr.to_ipv4_mapped().is_some()
        {
            return Err(ArgError::Gateway6Address(s.to_owned()));
        }
        Ok(gw)
    }
}

impl fmt::Display for Gateway6 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix_len)
    }
}

/// An IPv4 network `ADDR/PREFIX` (host bits cleared), or one address as `/32`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Cidr {
    pub network: Ipv4Addr,
    pub prefix_len: u8,
}

impl Cidr {
    pub fn mask(self) -> u32 {
        u32::MAX
            .checked_shl(32 - u32::from(self.prefix_len))
            .unwrap_or(0)
    }
}

/// Host bits are cleared, as `ip route` does: the trie matches on the prefix only.
pub fn parse_cidr(s: &str) -> Result<Cidr, ArgError> {
    let t = s.trim();
    let (a, p) = t.split_once('/').unwrap_or((t, "32"));
    let addr: Ipv4Addr = a
        .trim()
        .parse()
        .map_err(|_| ArgError::InboundSyntax(s.to_owned()))?;
    let prefix_len: u8 = match p.trim().parse::<u8>() {
        Ok(n) if n <= 32 => n,
        Ok(_) => return Err(ArgError::InboundPrefix(s.to_owned())),
        Err(_) if !p.trim().is_empty() && p.trim().bytes().all(|b| b.is_ascii_digit()) => {
            return Err(ArgError::InboundPrefix(s.to_owned()));
        }
        Err(_) => return Err(ArgError::InboundSyntax(s.to_owned())),
    };
    let mut c = Cidr {
        network: addr,
        prefix_len,
    };
    c.network = Ipv4Addr::from(u32::from(addr) & c.mask());
    Ok(c)
}

/// CIDRs separated by commas or whitespace; an empty value (`NETNS_ALLOW_INBOUND=` in
/// config.json) is an empty list.
pub fn parse_cidr_list(s: &str) -> Result<Vec<Cidr>, ArgError> {
    s.split(|c: char| c == ',' || c.is_whitespace())
        .filter(|p| !p.is_empty())
        .map(parse_cidr)
        .collect()
}

impl FromStr for Cidr {
    type Err = ArgError;
    fn from_str(s: &str) -> Result<Self, ArgError> {
        parse_cidr(s)
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix_len)
    }
}

/// Inclusive port range `MIN-MAX`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortRange {
    pub min: u16,
    pub max: u16,
}

impl FromStr for PortRange {
    type Err = ArgError;
    fn from_str(s: &str) -> Result<Self, ArgError> {
        let (a, b) = s.split_once('-').ok_or(ArgError::PortRange)?;
        let min: u16 = a.trim().parse().map_err(|_| ArgError::PortRange)?;
        let max: u16 = b.trim().parse().map_err(|_| ArgError::PortRange)?;
        if min == 0 || min > max {
            return Err(ArgError::PortRange);
        }
        Ok(PortRange { min, max })
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.min, self.max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gateway() {
        let g: Gateway = "10.1.2.3/24".parse().unwrap();
        assert_eq!(g.network(), Ipv4Addr::new(10, 1, 2, 0));
        assert_eq!(g.broadcast(), Ipv4Addr::new(10, 1, 2, 255));
        assert_eq!(g.subnet(), "10.1.2.0/24");
        assert!("10.0.0.1/30".parse::<Gateway>().is_ok());
        assert_eq!("10.0.0.1/31".parse::<Gateway>(), Err(ArgError::Prefix(31)));
        assert_eq!("10.0.0.1/0".parse::<Gateway>(), Err(ArgError::Prefix(0)));
        assert_eq!(
            "10.0.0.0/24".parse::<Gateway>(),
            Err(ArgError::NetworkAddress(Ipv4Addr::new(10, 0, 0, 0)))
        );
        assert_eq!(
            "10.0.0.255/24".parse::<Gateway>(),
            Err(ArgError::BroadcastAddress(Ipv4Addr::new(10, 0, 0, 255)))
        );
        for bad in ["10.0.0.1", "10.0.0.1/", "10.0.0/24", "10.0.0.1/x", "::1/64"] {
            assert_eq!(bad.parse::<Gateway>(), Err(ArgError::CidrSyntax), "{bad}");
        }
    }

    #[test]
    fn gateway6() {
        let g: Gateway6 = "fd00:19::1/64".parse().unwrap();
        let v4: Gateway = "172.19.0.1/16".parse().unwrap();
        assert_eq!(g.network(), "fd00:19::".parse::<Ipv6Addr>().unwrap());
        assert_eq!(
            g.host_for(v4, Ipv4Addr::new(172, 19, 1, 7)),
            "fd00:19::107".parse::<Ipv6Addr>().unwrap()
        );
        assert_eq!(g.check_fits(v4), Ok(()));
        let small: Gateway6 = "fd00:19::1/120".parse().unwrap();
        let e = small.check_fits(v4).unwrap_err();
        assert!(e.to_string().contains("/112 or shorter"), "{e}");
        let clash: Gateway6 = "fd00:19::5/64".parse().unwrap();
        let e = clash.check_fits(v4).unwrap_err();
        assert!(
            e.to_string().contains("172.19.0.5") && e.to_string().contains("fd00:19::1"),
            "{e}"
        );
        // Outside the IPv4 offsets: no container can get it.
        assert!(
            "fd00:19::1:0:1/64"
                .parse::<Gateway6>()
                .unwrap()
                .check_fits(v4)
                .is_ok()
        );
        for bad in ["fd00:19::1", "fd00:19::1/", "172.19.0.1/16", "fd00:19::1/x"] {
            assert_eq!(
                bad.parse::<Gateway6>(),
                Err(ArgError::Cidr6Syntax(bad.into())),
                "{bad}"
            );
        }
        for bad in ["fd00:19::1/130", "fd00:19::1/4", "fd00:19::1/128"] {
            assert_eq!(
                bad.parse::<Gateway6>(),
                Err(ArgError::Prefix6(bad.into())),
                "{bad}"
            );
        }
        for bad in [
            "fd00:19::/64",
            "ff02::1/64",
            "fe80::1/64",
            "::1/64",
            "::ffff:1.2.3.4/96",
        ] {
            assert_eq!(
                bad.parse::<Gateway6>(),
                Err(ArgError::Gateway6Address(bad.into())),
                "{bad}"
            );
        }
    }

    #[test]
    fn port_ranges() {
        assert_eq!("1-1".parse::<PortRange>(), Ok(PortRange { min: 1, max: 1 }));
        for bad in ["0-10", "10-9", "10", "a-b", "1-65536", "-5"] {
            assert!(bad.parse::<PortRange>().is_err(), "{bad}");
        }
    }
}
