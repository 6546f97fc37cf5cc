//! CHECK: the attachment is as ADD left it. Every difference found is named in one
//! error (code 104): interface, address, MAC, default route, host veth and bridge,
//! datapath endpoint and bridge port, port forwards (table and datapath), and the
//! previous result's address.

use std::collections::BTreeSet;

use super::conf::NetConf;
use super::error::{CniError, code, from_error};
use super::{Env, ipam_plugin, require_caps, result, runtime};
use crate::config::NetConfig;
use crate::datapath::Datapath;
use crate::ipam::{self, Lease};
use crate::network::{self, Netlink, format_mac};
use crate::portmap;
use crate::store::Store;

pub fn run(env: &Env, c: &NetConf, stdin: &[u8]) -> Result<(), CniError> {
    let key = env.key()?;
    let ifname = env.ifname()?;
    let netns = env.netns()?;
    let cfg = c.net_config()?;
    let specs = c.port_specs()?;
    require_caps("CNI CHECK")?;
    let missing = || {
        CniError::new(
            code::CHECK,
            format!("CHECK {key}: no such attachment (never added, or deleted)"),
        )
    };
    let store = Store::open_existing(&cfg.state_dir)
        .map_err(|e| from_error(code::IO, "opening the state directory", &e))?
        .ok_or_else(missing)?;
    let lock = store
        .lock_shared()
        .map_err(|e| from_error(code::IO, "locking the state directory", &e))?;
    let lease = ipam::get(&lock, &key)
        .map_err(|e| from_error(code::IO, "reading the leases", &e))?
        .ok_or_else(missing)?;
    let mut problems = Vec::new();
    if !lease.complete {
        problems.push("its ADD never finished".to_owned());
    }
    let want = std::iter::once(format!("{}/{}", lease.ip, lease.prefix_len))
        .chain(lease.addr6().map(|(a, len, _)| format!("{a}/{len}")));
    if let Some(prev) = &c.prev_result {
        let listed = result::result_addresses(prev);
        for want_addr in want.filter(|w| !listed.contains(w)) {
            problems.push(format!("prevResult does not list {want_addr}"));
        }
    }
    runtime()?.block_on(async {
        check_container(netns, ifname, &lease, &mut problems).await;
        check_host(&cfg, &lease, &mut problems).await;
    });
    check_datapath(&cfg, &key, &lease, &specs, &lock, &mut problems);
    if let Some(t) = &c.ipam_type()? {
        ipam_plugin::exec(t, "CHECK", &env.path, stdin)?;
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(CniError::new(
            code::CHECK,
            format!("CHECK {key}: {}", problems.join("; ")),
        ))
    }
}

async fn check_container(netns: &str, ifname: &str, lease: &Lease, problems: &mut Vec<String>) {
    let ns = match network::open_netns_path(netns) {
        Ok(ns) => ns,
        Err(e) => return problems.push(crate::error_chain(&e)),
    };
    let nl = match Netlink::in_netns(&ns) {
        Ok(nl) => nl,
        Err(e) => return problems.push(crate::error_chain(&e)),
    };
    let link = match nl.link_by_name(ifname).await {
        Ok(Some(l)) => l,
        Ok(None) => return problems.push(format!("no interface {ifname} in {netns}")),
        Err(e) => return problems.push(crate::error_chain(&e)),
    };
    if !link.up {
        problems.push(format!("{ifname} is down"));
    }
    let mac = link.mac.map(format_mac);
    if lease.mac.is_some() && mac != lease.mac {
        problems.push(format!(
            "{ifname} has MAC {}, ADD recorded {}",
            mac.unwrap_or_default(),
            lease.mac.clone().unwrap_or_default()
        ));
    }
    match nl.ipv4_addrs(link.index).await {
        Ok(a) if a.contains(&(lease.ip, lease.prefix_len)) => {}
        Ok(a) => problems.push(format!(
            "{ifname} lacks {}/{} (has {})",
            lease.ip,
            lease.prefix_len,
            a.iter()
                .map(|(ip, p)| format!("{ip}/{p}"))
                .collect::<Vec<_>>()
                .join(", ")
        )),
        Err(e) => problems.push(crate::error_chain(&e)),
    }
    if let Some((ip6, len6, _)) = lease.addr6() {
        match nl.ipv6_addrs(link.index).await {
            Ok(a) if a.contains(&(ip6, len6)) => {}
            Ok(_) => problems.push(format!("{ifname} lacks {ip6}/{len6}")),
            Err(e) => problems.push(crate::error_chain(&e)),
        }
    }
    match nl.default_route_ifindex().await {
        Ok(Some(i)) if i == link.index => {}
        Ok(_) => problems.push(format!("the default route does not go out of {ifname}")),
        Err(e) => problems.push(crate::error_chain(&e)),
    }
}

async fn check_host(cfg: &NetConfig, lease: &Lease, problems: &mut Vec<String>) {
    let nl = match Netlink::current() {
        Ok(nl) => nl,
        Err(e) => return problems.push(crate::error_chain(&e)),
    };
    let br = match nl.link_by_name(&cfg.bridge).await {
        Ok(Some(b)) => b,
        Ok(None) => return problems.push(format!("no bridge {}", cfg.bridge)),
        Err(e) => return problems.push(crate::error_chain(&e)),
    };
    match nl.link_by_index(lease.host_ifindex).await {
        Ok(Some(v)) if v.name == lease.host_veth => {
            if v.controller != Some(br.index) {
                problems.push(format!(
                    "host veth {} is not on bridge {}",
                    v.name, cfg.bridge
                ));
            }
            if !v.up {
                problems.push(format!("host veth {} is down", v.name));
            }
        }
        Ok(_) => problems.push(format!(
            "host veth {} (ifindex {}) is gone",
            lease.host_veth, lease.host_ifindex
        )),
        Err(e) => problems.push(crate::error_chain(&e)),
    }
}

fn check_datapath(
    cfg: &NetConfig,
    key: &str,
    lease: &Lease,
    specs: &[portmap::PortSpec],
    lock: &crate::store::Locked<'_>,
    problems: &mut Vec<String>,
) {
    let dp = match Datapath::open(&cfg.bpffs_dir) {
        Ok(Some(dp)) => dp,
        Ok(None) => {
            return problems.push(format!(
                "no datapath is loaded under {}",
                cfg.bpffs_dir.display()
            ));
        }
        Err(e) => return problems.push(crate::error_chain(&e)),
    };
    let mut report = |r: Result<Option<String>, crate::datapath::DatapathError>| match r {
        Ok(Some(p)) => problems.push(p),
        Ok(None) => {}
        Err(e) => problems.push(crate::error_chain(&e)),
    };
    report(
        dp.endpoints()
            .and_then(|m| m.get(lease.ip))
            .map(|ep| match ep {
                Some(ep)
                    if ep.ifindex == lease.host_ifindex
                        && lease.mac.as_deref().is_none_or(|m| m == format_mac(ep.mac)) =>
                {
                    None
                }
                Some(ep) => Some(format!(
                    "datapath endpoint {} points at ifindex {} / {}",
                    lease.ip,
                    ep.ifindex,
                    format_mac(ep.mac)
                )),
                None => Some(format!("no datapath endpoint for {}", lease.ip)),
            }),
    );
    report(
        dp.bridge_ports()
            .and_then(|m| m.get(lease.host_ifindex))
            .map(|p| match p {
                Some(p) if p.ip == lease.ip => None,
                _ => Some(format!(
                    "no datapath bridge port for ifindex {}",
                    lease.host_ifindex
                )),
            }),
    );
    // Port forwards: runtimeConfig's, the table's and the datapath's must agree.
    type Sig = (String, String, u16);
    let sig = |m: &portmap::Mapping| -> Sig { (m.host(), m.proto.to_string(), m.container_port) };
    let want: BTreeSet<Sig> = portmap::expand(key, lease.ip, lease.ip6, specs)
        .iter()
        .map(sig)
        .collect();
    let table: Vec<_> = match portmap::load_table(lock) {
        Ok(t) => t.into_iter().filter(|m| m.container_id == key).collect(),
        Err(e) => return problems.push(crate::error_chain(&e)),
    };
    let have: BTreeSet<Sig> = table.iter().map(sig).collect();
    for (host, proto, cport) in want.difference(&have) {
        problems.push(format!("port forward {host}->{cport}/{proto} is missing"));
    }
    for (host, proto, cport) in have.difference(&want) {
        problems.push(format!(
            "port forward {host}->{cport}/{proto} is not in runtimeConfig"
        ));
    }
    let forwards = match dp.port_forwards() {
        Ok(f) => f,
        Err(e) => return problems.push(crate::error_chain(&e)),
    };
    for m in table.iter().filter(|m| m.forwards_v4()) {
        match forwards.get(m.key()) {
            Ok(Some(f)) if *f.target.ip() == lease.ip && f.target.port() == m.container_port => {}
            Ok(_) => problems.push(format!(
                "the datapath does not forward {} to {}:{}",
                m.key(),
                lease.ip,
                m.container_port
            )),
            Err(e) => problems.push(crate::error_chain(&e)),
        }
    }
}
