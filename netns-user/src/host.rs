//! The host side every container shares: uplink, bridge, IPv4 forwarding, the NAT
//! port reservation, and the datapath with its socket programs. Made (or found) once
//! and never undone per container. The hook, `netns load` and `netns datapath check`
//! all go through these functions, so each default (MTU, datapath config, cgroup)
//! has one definition.

use std::path::PathBuf;

use crate::apply::{self, ApplyError};
use crate::cgroup::{self, CgroupError};
use crate::config::NetConfig;
use crate::datapath::{Datapath, DatapathConfig, DatapathError};
use crate::network::{self, Link, Netlink, NetworkError, Uplink, bridge, sysctl};
use crate::reserve::{self, ReserveError};
use crate::store::Locked;

#[derive(Debug, thiserror::Error)]
pub enum HostError {
    #[error(transparent)]
    Network(#[from] NetworkError),
    #[error(transparent)]
    Sysctl(#[from] sysctl::SysctlError),
    #[error(transparent)]
    Datapath(#[from] DatapathError),
    #[error(transparent)]
    Cgroup(#[from] CgroupError),
    #[error(transparent)]
    Reserve(#[from] ReserveError),
    #[error(transparent)]
    Apply(#[from] ApplyError),
}

/// The uplink and bridge as found or made.
#[derive(Debug, Clone)]
pub struct Host {
    pub uplink: Uplink,
    pub bridge: Link,
    pub mtu: u32,
}

/// The uplink: `--uplink`, or the device of the default route.
pub async fn uplink(cfg: &NetConfig, nl: &Netlink) -> Result<Uplink, NetworkError> {
    network::uplink(nl, cfg.uplink.as_deref()).await
}

/// MTU of bridge and veths: `--mtu`, else the uplink's, else 1500.
pub fn mtu(cfg: &NetConfig, uplink: &Uplink) -> u32 {
    cfg.mtu.or(uplink.mtu).unwrap_or(network::DEFAULT_MTU)
}

/// The bridge with its address, MTU and hardened sysctls (created if missing). A
/// `--ip6` that does not fit the IPv4 subnet is refused before anything is made.
pub async fn bridge(cfg: &NetConfig, nl: &Netlink, mtu: u32) -> Result<Link, NetworkError> {
    if let Some(g6) = cfg.gateway6 {
        g6.check_fits(cfg.gateway)?;
    }
    bridge::ensure(nl, &cfg.bridge, cfg.gateway, cfg.gateway6, mtu).await
}

/// IPv4 forwarding on in this namespace (the classic hook never did: runc issue 1856),
/// and IPv6 forwarding with `--ip6` (the uplink keeping its router advertisements).
pub fn enable_forwarding(cfg: &NetConfig, uplink: &Uplink) -> Result<(), sysctl::SysctlError> {
    if sysctl::enable_ip_forward()? {
        log::info!("enabled IPv4 forwarding");
    }
    if cfg.gateway6.is_some() {
        let r = sysctl::enable_ip6_forward(&uplink.name)?;
        if let Some(up) = r.kept_ra_on {
            log::info!(
                "set net.ipv6.conf.{up}.accept_ra to 2: with IPv6 forwarding on, the uplink keeps accepting router advertisements"
            );
        }
        if r.enabled {
            log::info!("enabled IPv6 forwarding");
        }
    }
    Ok(())
}

/// Uplink, bridge and forwarding, for callers that need the whole host side at once.
pub async fn prepare(cfg: &NetConfig, nl: &Netlink) -> Result<Host, HostError> {
    let uplink = uplink(cfg, nl).await?;
    let mtu = mtu(cfg, &uplink);
    let bridge = bridge(cfg, nl, mtu).await?;
    enable_forwarding(cfg, &uplink)?;
    Ok(Host {
        uplink,
        bridge,
        mtu,
    })
}

/// What the datapath is loaded with: the one place it is built.
pub fn datapath_config(cfg: &NetConfig, uplink: &Uplink, bridge: &Link) -> DatapathConfig {
    DatapathConfig {
        bpffs_dir: cfg.bpffs_dir.clone(),
        uplink_ifindex: uplink.index,
        uplink_addr: uplink.addr,
        uplink_addr6: uplink.addr6,
        bridge_ifindex: bridge.index,
        gateway: cfg.gateway.addr,
        prefix_len: cfg.gateway.prefix_len,
        gateway6: cfg.gateway6.map(|g| (g.addr, g.prefix_len)),
        nat_ports: (cfg.nat_ports.min, cfg.nat_ports.max),
        ct_max: cfg.ct_max,
        fast_path: cfg.fast_path,
        ct_counters: cfg.ct_counters,
        ct_per_container: cfg
            .ct_max_per_container
            .unwrap_or_else(|| cfg.ct_max.unwrap_or(netns_common::CT_MAX_ENTRIES) / 4),
        allow_inbound: cfg.allow_inbound.clone(),
        no_masquerade: cfg.no_masquerade.clone(),
    }
}

/// The cgroup the socket programs attach to, if any.
pub fn cgroup(cfg: &NetConfig) -> Result<Option<PathBuf>, CgroupError> {
    cgroup::resolve(&cfg.cgroup)
}

/// The fast path skips netfilter's FORWARD chain: one line when rules there name the
/// bridge or the subnet (they will not see translated traffic).
fn warn_bypassed_forward_rules(cfg: &NetConfig) {
    let needles = [cfg.bridge.clone(), cfg.gateway.subnet()];
    let rules = crate::network::forward_rules::mentioning(&needles);
    if let Some(first) = rules.first() {
        log::warn!(
            "--fast-path on bypasses netfilter FORWARD for translated traffic; {} rule(s) there \
             name {} or its subnet and will not see it (e.g. `{first}`); --fast-path off \
             keeps them in the path",
            rules.len(),
            cfg.bridge
        );
    }
}

/// Loads the datapath (or opens its pins and refreshes its config), attaches the
/// socket programs, and reserves the NAT port range so host sockets never pick a
/// masquerade port as their ephemeral port. `lock`: the state lock, when there is a
/// state directory (the reservation record lives there).
pub fn load_datapath(
    cfg: &NetConfig,
    uplink: &Uplink,
    bridge: &Link,
    lock: Option<&Locked<'_>>,
) -> Result<Datapath, HostError> {
    let mut dp = Datapath::ensure_loaded(&datapath_config(cfg, uplink, bridge))?;
    if let Some(cg) = cgroup(cfg)? {
        dp.attach_cgroup(&cg)?;
    }
    reserve::nat_range(lock, cfg.nat_ports.min, cfg.nat_ports.max)?;
    if cfg.fast_path {
        warn_bypassed_forward_rules(cfg);
    }
    // A fresh datapath (first load, an upgrade from an older layout, after `datapath
    // unload`) knows none of the containers the state directory holds: re-derive them.
    if dp.freshly_loaded()
        && let Some(lock) = lock
    {
        let a = apply::apply(lock, Some(&mut dp))?;
        for c in &a.changes {
            log::info!("after a fresh load: {c}");
        }
        for f in &a.failures {
            log::warn!("after a fresh load: {f}");
        }
    }
    Ok(dp)
}
