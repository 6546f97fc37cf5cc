//! ADD: one attachment, made by the container service as the hook makes a container's
//! network; every failure after the IPAM plugin's ADD also releases its address.

use std::net::Ipv4Addr;
use std::os::unix::fs::MetadataExt as _;

use serde_json::{Value, json};

use super::conf::NetConf;
use super::error::{CniError, code, from_error};
use super::result::{self, CniResult, Interface, IpConfig, Route};
use super::{Env, ipam_plugin, request, require_caps, runtime};
use crate::config::{Gateway, NetConfig};
use crate::container::{self, SetupError, StepError};
use crate::ipam::{self, CniAttachment, IpamError};
use crate::network::{self, Netlink, format_mac};
use crate::portmap::{self, PortMapError};
use crate::store::{Locked, Store};
use crate::{host, reconcile};

pub fn run(env: &Env, c: &NetConf, stdin: &[u8]) -> Result<Value, CniError> {
    env.key()?;
    let ifname = env.ifname()?;
    let netns = env.netns()?;
    let mut cfg = c.net_config()?;
    let specs = c.port_specs()?;
    let ipam_type = c.ipam_type()?;
    require_caps("CNI ADD")?;
    let faults =
        crate::hook::faults().map_err(|e| from_error(code::INVALID_ENV, "fault injection", &e))?;
    let bad_netns = |e: &dyn std::error::Error| {
        from_error(
            code::INVALID_ENV,
            &format!("CNI_NETNS {netns} is not usable"),
            e,
        )
    };
    let ns = network::open_netns_path(netns).map_err(|e| bad_netns(&e))?;
    let netns_ino = ns.metadata().map_err(|e| bad_netns(&e))?.ino();
    let store = Store::open(&cfg.state_dir)
        .map_err(|e| from_error(code::IO, "opening the state directory", &e))?;
    let lock = store
        .lock()
        .map_err(|e| from_error(code::IO, "locking the state directory", &e))?;
    runtime()?.block_on(async {
        let nl = Netlink::current().map_err(|e| from_error(code::SETUP, "netlink", &e))?;
        let ns_nl = Netlink::in_netns(&ns)
            .map_err(|e| from_error(code::SETUP, "netlink in CNI_NETNS", &e))?;
        // The spec: ADD of an interface that exists is an error (and nothing of the
        // first attachment may be touched).
        if ns_nl
            .link_by_name(ifname)
            .await
            .map_err(|e| from_error(code::SETUP, "listing interfaces", &e))?
            .is_some()
        {
            return Err(CniError::new(
                code::IF_EXISTS,
                format!("interface {ifname} already exists in {netns}"),
            ));
        }
        heal_dead_hook_containers(&cfg, &lock, &nl).await;
        let fixed = match &ipam_type {
            None => None,
            Some(t) => Some(delegated_address(&mut cfg, c, t, env, stdin)?),
        };
        let r = attach(
            &cfg, &lock, &nl, env, c, &ns, netns_ino, fixed, specs, faults,
        )
        .await;
        if r.is_err()
            && let Some(t) = &ipam_type
            && let Err(e) = ipam_plugin::exec(t, "DEL", &env.path, stdin)
        {
            log::warn!("releasing the IPAM plugin's address after a failed ADD: {e}");
        }
        let lease = r?;
        let res = describe(&cfg, &nl, netns, ifname, &lease, c.dns.clone()).await?;
        Ok(res.to_json(&c.cni_version))
    })
}

/// Leases of hook containers whose pid died are healed before allocating, as the hook
/// does (CNI attachments are the runtime's to end).
async fn heal_dead_hook_containers(cfg: &NetConfig, lock: &Locked<'_>, nl: &Netlink) {
    let mode = reconcile::Mode::DeadPids { skip: None };
    match reconcile::run(cfg, lock, nl, mode).await {
        Ok(r) => r.lines().iter().for_each(|l| log::warn!("reconcile: {l}")),
        Err(e) => log::warn!("reconcile before ADD failed: {}", crate::error_chain(&e)),
    }
}

/// The IPAM plugin's address; it must fit the bridge subnet (`ip`), or, without `ip`,
/// it decides the subnet and gateway.
fn delegated_address(
    cfg: &mut NetConfig,
    c: &NetConf,
    plugin: &str,
    env: &Env,
    stdin: &[u8],
) -> Result<Ipv4Addr, CniError> {
    let r = ipam_plugin::exec(plugin, "ADD", &env.path, stdin)?;
    let bad = |msg: String| {
        // The address is the plugin's: give it back before failing.
        if let Err(e) = ipam_plugin::exec(plugin, "DEL", &env.path, stdin) {
            log::warn!("releasing the IPAM plugin's address: {e}");
        }
        CniError::new(code::ADDRESS, msg)
    };
    let Some((ip, prefix, gw)) = result::ipam_address(&r) else {
        return Err(bad(format!(
            "IPAM plugin {plugin} returned no IPv4 address: {r}"
        )));
    };
    if c.ip.is_none() {
        let network = u32::from(ip) & u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
        let addr = gw.unwrap_or(Ipv4Addr::from(network + 1));
        cfg.gateway = format!("{addr}/{prefix}").parse::<Gateway>().map_err(|e| {
            bad(format!(
                "IPAM plugin {plugin}: gateway {addr}/{prefix}: {e}"
            ))
        })?;
    } else if prefix != cfg.gateway.prefix_len || gw.is_some_and(|g| g != cfg.gateway.addr) {
        return Err(bad(format!(
            "IPAM plugin {plugin} gave {ip}/{prefix} (gateway {}), which does not match \"ip\" {}",
            gw.map_or("none".to_owned(), |g| g.to_string()),
            cfg.gateway
        )));
    }
    Ok(ip)
}

#[expect(
    clippy::too_many_arguments,
    reason = "one call site; the pieces of one ADD"
)]
async fn attach(
    cfg: &NetConfig,
    lock: &Locked<'_>,
    nl: &Netlink,
    env: &Env,
    c: &NetConf,
    ns: &std::fs::File,
    netns_ino: u64,
    fixed: Option<Ipv4Addr>,
    specs: Vec<portmap::PortSpec>,
    faults: container::Faults,
) -> Result<ipam::Lease, CniError> {
    let key = env.key()?;
    let ifname = env.ifname()?;
    let mut req = request(&key, ifname, ns, netns_ino);
    req.fixed_ip = fixed;
    req.cni = Some(CniAttachment {
        container_id: env.container_id()?.to_owned(),
        ifname: ifname.to_owned(),
        network: c.name.clone(),
        netns: env.netns()?.to_owned(),
        ipam: c.ipam_type()?,
    });
    let step_err = |e: StepError| setup_error_code(&e, "ADD");
    // A lease of this key whose interface is gone is a leftover (a lost DEL): torn
    // down here, keeping nothing but the address.
    if container::already_done(cfg, lock, nl, &req)
        .await
        .map_err(step_err)?
    {
        return Err(CniError::new(
            code::IF_EXISTS,
            format!("attachment {key} already exists"),
        ));
    }
    if let Some(old) = ipam::get(lock, &key).map_err(|e| step_err(e.into()))?
        && fixed.is_some_and(|ip| ip != old.ip)
    {
        // The IPAM plugin chose another address this time: it is the plugin's call.
        ipam::release(lock, &key).map_err(|e| step_err(e.into()))?;
    }
    if !specs.is_empty() {
        let new = portmap::expand(
            &key,
            Ipv4Addr::UNSPECIFIED,
            portmap::unspecified6(cfg),
            &specs,
        );
        portmap::load_table(lock)
            .and_then(|t| portmap::validate(&t, &new, true))
            .map_err(|e| step_err(e.into()))?;
        req.ports = Some(specs);
    }
    let uplink = host::uplink(cfg, nl)
        .await
        .map_err(|e| step_err(e.into()))?;
    container::setup(cfg, lock, nl, &uplink, req, faults)
        .await
        .map_err(|e: SetupError| {
            let mut err = setup_error_code(&e.source, "ADD");
            err.msg = format!("ADD {key}: {e}");
            err
        })?;
    let lease = ipam::get(lock, &key)
        .map_err(|e| step_err(e.into()))?
        .ok_or_else(|| CniError::new(code::SETUP, format!("lease of {key} vanished")))?;
    Ok(lease)
}

/// The CNI code of a setup failure: refused port mappings and addresses are the
/// caller's to fix, everything else is ours.
pub(super) fn setup_error_code(e: &StepError, what: &str) -> CniError {
    let code = match e {
        StepError::PortMap(
            PortMapError::Collision { .. }
            | PortMapError::Duplicate(_)
            | PortMapError::InUse { .. }
            | PortMapError::NotLocal(_),
        ) => code::PORT_MAPPING,
        StepError::Ipam(
            IpamError::Exhausted { .. }
            | IpamError::SubnetMismatch { .. }
            | IpamError::OutsideSubnet { .. }
            | IpamError::Reserved { .. }
            | IpamError::Taken { .. },
        ) => code::ADDRESS,
        _ => code::SETUP,
    };
    from_error(code, what, e)
}

/// The result: bridge, host veth, container interface; the address on the latter.
async fn describe(
    cfg: &NetConfig,
    nl: &Netlink,
    netns: &str,
    ifname: &str,
    lease: &ipam::Lease,
    dns: Option<Value>,
) -> Result<CniResult, CniError> {
    let mac_of =
        |l: Option<network::Link>| l.and_then(|l| l.mac).map(format_mac).unwrap_or_default();
    let nl_err = |e: network::NetlinkError| from_error(code::SETUP, "reading the links back", &e);
    let br = nl.link_by_name(&cfg.bridge).await.map_err(nl_err)?;
    let veth = nl.link_by_index(lease.host_ifindex).await.map_err(nl_err)?;
    Ok(CniResult {
        interfaces: vec![
            Interface {
                name: cfg.bridge.clone(),
                mac: mac_of(br),
                sandbox: None,
            },
            Interface {
                name: lease.host_veth.clone(),
                mac: mac_of(veth),
                sandbox: None,
            },
            Interface {
                name: ifname.to_owned(),
                mac: lease.mac.clone().unwrap_or_default(),
                sandbox: Some(netns.to_owned()),
            },
        ],
        ips: std::iter::once(IpConfig {
            address: format!("{}/{}", lease.ip, lease.prefix_len),
            gateway: lease.gateway.into(),
            interface: 2,
        })
        .chain(lease.addr6().map(|(ip6, len, gw6)| IpConfig {
            address: format!("{ip6}/{len}"),
            gateway: gw6.into(),
            interface: 2,
        }))
        .collect(),
        routes: std::iter::once(Route {
            dst: "0.0.0.0/0".into(),
            gw: lease.gateway.into(),
        })
        .chain(lease.addr6().map(|(_, _, gw6)| Route {
            dst: "::/0".into(),
            gw: gw6.into(),
        }))
        .collect(),
        dns: dns.unwrap_or_else(|| json!({})),
    })
}
