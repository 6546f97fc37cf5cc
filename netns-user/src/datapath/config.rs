//! `NETNS_CONFIG`: what the programs need to know about the host side, and the
//! conntrack timeouts the collector reads.

use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::PathBuf;

use aya::maps::{Array, MapData};
use netns_common::{Config, In6, Timeouts, empty, maps};

use super::{Cidr, Datapath, DatapathError, io, map_err, sys};

/// What the datapath needs to know about the host side of the network.
#[derive(Debug, Clone)]
pub struct DatapathConfig {
    /// Base bpffs directory; pins live in `<bpffs_dir>/v<LAYOUT_VERSION>`.
    pub bpffs_dir: PathBuf,
    pub uplink_ifindex: u32,
    /// The uplink's IPv4 address (masquerade source); None if it has none yet.
    pub uplink_addr: Option<Ipv4Addr>,
    /// The uplink's global IPv6 address (NAT66 source); None if it has none yet.
    pub uplink_addr6: Option<Ipv6Addr>,
    pub bridge_ifindex: u32,
    pub gateway: Ipv4Addr,
    pub prefix_len: u8,
    /// `--ip6`: the bridge's IPv6 gateway and the containers' prefix length.
    pub gateway6: Option<(Ipv6Addr, u8)>,
    /// Masquerade port range when a container's source port is taken.
    pub nat_ports: (u16, u16),
    /// Size of the conntrack table when the datapath is first loaded (None: default).
    pub ct_max: Option<u32>,
    /// Conntrack pairs one container may hold (0: no limit).
    pub ct_per_container: u32,
    /// Translated packets bypass the host stack.
    pub fast_path: bool,
    /// Conntrack entries count packets and bytes.
    pub ct_counters: bool,
    /// `--allow-inbound`: what the inbound trie holds after [`Datapath::ensure_loaded`].
    pub allow_inbound: Vec<Cidr>,
    /// `--no-masquerade`: what the no-masquerade trie holds after
    /// [`Datapath::ensure_loaded`].
    pub no_masquerade: Vec<Cidr>,
}

/// The config the datapath runs with, in host order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settings {
    pub subnet: Ipv4Addr,
    pub prefix_len: u8,
    pub gateway: Ipv4Addr,
    /// None: the uplink has no address, the programs pass everything untouched.
    pub uplink_addr: Option<Ipv4Addr>,
    /// IPv6 gateway and prefix length (None: IPv6 off for containers).
    pub gateway6: Option<(Ipv6Addr, u8)>,
    /// None: no NAT66 source, container IPv6 to the outside is dropped.
    pub uplink_addr6: Option<Ipv6Addr>,
    pub uplink_ifindex: u32,
    pub bridge_ifindex: u32,
    pub nat_ports: (u16, u16),
    pub bridge_mac: [u8; 6],
    pub netns_cookie: u64,
    pub timeouts: Timeouts,
    pub ct_per_container: u32,
    pub port_seed: u32,
    /// Translated packets bypass the host stack (`--fast-path on`).
    pub fast_path: bool,
    /// Conntrack entries count packets and bytes (`--ct-counters on`).
    pub ct_counters: bool,
    /// [`netns_common::empty`] bits: the tries the programs need not look up.
    pub empty: u8,
}

impl Settings {
    fn to_raw(self) -> Config {
        let mask = prefix_mask(self.prefix_len);
        Config {
            subnet: (u32::from(self.subnet) & mask).to_be(),
            subnet_mask: mask.to_be(),
            gateway: u32::from(self.gateway).to_be(),
            uplink_addr: self.uplink_addr.map_or(0, |a| u32::from(a).to_be()),
            uplink_ifindex: self.uplink_ifindex,
            bridge_ifindex: self.bridge_ifindex,
            nat_port_min: self.nat_ports.0,
            nat_port_max: self.nat_ports.1,
            bridge_mac: self.bridge_mac,
            fast_path: self.fast_path as u8,
            ct_counters: self.ct_counters as u8,
            empty: self.empty,
            _pad: [0; 3],
            netns_cookie: self.netns_cookie,
            timeouts: self.timeouts,
            ct_per_container: self.ct_per_container,
            port_seed: self.port_seed,
            subnet6: self.gateway6.map_or(In6::ZERO, |(g, len)| {
                in6(Ipv6Addr::from(u128::from(g) & prefix_mask6(len)))
            }),
            subnet6_mask: self
                .gateway6
                .map_or(In6::ZERO, |(_, len)| in6(Ipv6Addr::from(prefix_mask6(len)))),
            gateway6: self.gateway6.map_or(In6::ZERO, |(g, _)| in6(g)),
            uplink_addr6: self.uplink_addr6.map_or(In6::ZERO, in6),
        }
    }

    fn from_raw(c: &Config) -> Settings {
        let mask = u32::from_be(c.subnet_mask);
        Settings {
            subnet: Ipv4Addr::from(u32::from_be(c.subnet)),
            prefix_len: mask.count_ones() as u8,
            gateway: Ipv4Addr::from(u32::from_be(c.gateway)),
            uplink_addr: (c.uplink_addr != 0).then(|| Ipv4Addr::from(u32::from_be(c.uplink_addr))),
            uplink_ifindex: c.uplink_ifindex,
            bridge_ifindex: c.bridge_ifindex,
            nat_ports: (c.nat_port_min, c.nat_port_max),
            bridge_mac: c.bridge_mac,
            netns_cookie: c.netns_cookie,
            timeouts: c.timeouts,
            ct_per_container: c.ct_per_container,
            port_seed: c.port_seed,
            fast_path: c.fast_path != 0,
            ct_counters: c.ct_counters != 0,
            empty: c.empty,
            gateway6: (!c.gateway6.is_zero()).then(|| {
                (
                    Ipv6Addr::from(c.gateway6.octets()),
                    u128::from(Ipv6Addr::from(c.subnet6_mask.octets())).count_ones() as u8,
                )
            }),
            uplink_addr6: (!c.uplink_addr6.is_zero())
                .then(|| Ipv6Addr::from(c.uplink_addr6.octets())),
        }
    }
}

fn in6(a: Ipv6Addr) -> In6 {
    In6::from_octets(a.octets())
}

fn prefix_mask6(prefix_len: u8) -> u128 {
    u128::MAX
        .checked_shl(128 - u32::from(prefix_len.min(128)))
        .unwrap_or(0)
}

fn prefix_mask(prefix_len: u8) -> u32 {
    u32::MAX
        .checked_shl(32 - u32::from(prefix_len.min(32)))
        .unwrap_or(0)
}

impl DatapathConfig {
    /// The settings `cfg` gives, with the bridge's MAC (rtnetlink) and this namespace's
    /// cookie; `timeouts` are the defaults.
    fn settings(&self) -> Result<Settings, DatapathError> {
        let bridge_mac = crate::network::netlink::link_mac(self.bridge_ifindex)
            .map_err(|source| DatapathError::BridgeMac {
                ifindex: self.bridge_ifindex,
                source,
            })?
            .ok_or(DatapathError::NoBridgeMac(self.bridge_ifindex))?;
        let netns_cookie =
            sys::netns_cookie().map_err(io("reading this network namespace's cookie"))?;
        Ok(Settings {
            subnet: self.gateway,
            prefix_len: self.prefix_len,
            gateway: self.gateway,
            uplink_addr: self.uplink_addr,
            gateway6: self.gateway6,
            uplink_addr6: if self.gateway6.is_some() {
                self.uplink_addr6
            } else {
                None
            },
            uplink_ifindex: self.uplink_ifindex,
            bridge_ifindex: self.bridge_ifindex,
            nat_ports: self.nat_ports,
            bridge_mac,
            netns_cookie,
            timeouts: Timeouts::default(),
            ct_per_container: self.ct_per_container,
            port_seed: 0,
            fast_path: self.fast_path,
            ct_counters: self.ct_counters,
            // The tries are made to hold exactly these lists right after.
            empty: if self.no_masquerade.is_empty() {
                empty::NOMASQ
            } else {
                0
            } | if self.allow_inbound.is_empty() {
                empty::INBOUND
            } else {
                0
            },
        })
    }
}

impl Datapath {
    fn config_map(&self) -> Result<Array<MapData, Config>, DatapathError> {
        Array::try_from(aya::maps::Map::Array(self.map_data(maps::CONFIG)?))
            .map_err(map_err("opening the config map"))
    }

    fn read_raw_config(&self) -> Result<Config, DatapathError> {
        self.config_map()?
            .get(&0, 0)
            .map_err(map_err("reading the config map"))
    }

    fn write_raw_config(&self, c: Config) -> Result<(), DatapathError> {
        self.config_map()?
            .set(0, c, 0)
            .map_err(map_err("writing the config map"))
    }

    /// Writes the config, keeping conntrack timeouts already set (see `set_timeouts`).
    pub(super) fn write_config(&self, cfg: &DatapathConfig) -> Result<(), DatapathError> {
        let mut v = cfg.settings()?;
        let old = self.read_raw_config()?;
        // A fresh map is all zeroes: timeouts set before (`netns gc --timeouts`) stay.
        if old.timeouts.tcp_established != 0 {
            v.timeouts = old.timeouts;
        }
        // The probe salt is chosen once: flows keep the ports they were given.
        v.port_seed = if old.port_seed != 0 {
            old.port_seed
        } else {
            sys::random_u32().map_err(io("reading a random port seed"))? | 1
        };
        self.write_raw_config(v.to_raw())
    }

    /// Changes the config in place (timeouts).
    fn update_config(&self, f: impl FnOnce(&mut Settings)) -> Result<(), DatapathError> {
        let mut v = Settings::from_raw(&self.read_raw_config()?);
        f(&mut v);
        self.write_raw_config(v.to_raw())
    }

    /// Sets the conntrack timeouts every collector uses.
    pub fn set_timeouts(&self, t: Timeouts) -> Result<(), DatapathError> {
        self.update_config(|c| c.timeouts = t)
    }

    /// The config the datapath runs with.
    pub fn config(&self) -> Result<Settings, DatapathError> {
        Ok(Settings::from_raw(&self.read_raw_config()?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_convert_to_network_order_and_back() {
        let s = Settings {
            subnet: Ipv4Addr::new(172, 19, 0, 1),
            prefix_len: 16,
            gateway: Ipv4Addr::new(172, 19, 0, 1),
            uplink_addr: Some(Ipv4Addr::new(198, 51, 100, 3)),
            uplink_ifindex: 2,
            bridge_ifindex: 5,
            nat_ports: (61000, 65535),
            bridge_mac: [2, 0, 0, 0, 0, 1],
            netns_cookie: 4096,
            timeouts: Timeouts::default(),
            ct_per_container: 100,
            port_seed: 7,
            fast_path: true,
            ct_counters: true,
            empty: empty::INBOUND,
            gateway6: Some(("fd00:19::1".parse().unwrap(), 64)),
            uplink_addr6: Some("2001:db8:100::2".parse().unwrap()),
        };
        let raw = s.to_raw();
        // IPv6 addresses in memory as on the wire.
        assert_eq!(raw.subnet6.octets()[..8], [0xfd, 0, 0, 0x19, 0, 0, 0, 0]);
        assert_eq!(raw.subnet6.octets()[8..], [0; 8]);
        assert_eq!(raw.subnet6_mask.octets(), [[0xff; 8], [0; 8]].concat()[..]);
        assert_eq!(raw.gateway6.octets()[15], 1);
        assert_eq!(raw.uplink_addr6.octets()[..4], [0x20, 0x01, 0x0d, 0xb8]);
        assert_eq!(raw.subnet, u32::from(Ipv4Addr::new(172, 19, 0, 0)).to_be());
        assert_eq!(raw.subnet_mask, 0xffff_0000u32.to_be());
        assert_eq!(raw.gateway, u32::from(s.gateway).to_be());
        assert_eq!(raw.uplink_addr.to_ne_bytes(), [198, 51, 100, 3]);
        // Ports of the NAT range stay in host order (the programs compare them so).
        assert_eq!((raw.nat_port_min, raw.nat_port_max), (61000, 65535));
        let back = Settings::from_raw(&raw);
        assert_eq!(back.subnet, Ipv4Addr::new(172, 19, 0, 0));
        assert_eq!(
            Settings {
                subnet: s.subnet,
                ..back
            },
            s
        );
        let none = Settings {
            uplink_addr: None,
            gateway6: None,
            uplink_addr6: None,
            ..s
        };
        assert!(none.to_raw().subnet6.is_zero() && none.to_raw().gateway6.is_zero());
        assert_eq!(none.to_raw().uplink_addr, 0);
        assert_eq!(Settings::from_raw(&none.to_raw()).uplink_addr, None);
        assert_eq!(prefix_mask(0), 0);
        assert_eq!(prefix_mask(32), u32::MAX);
    }
}
