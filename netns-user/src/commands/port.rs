//! `netns port add|rm|ls`: port forwards, live (no program reload).

use std::io::Write as _;
use std::net::{Ipv4Addr, Ipv6Addr};

use super::CommandError;
use crate::cli::{GlobalArgs, PortCommand};
use crate::datapath::Datapath;
use crate::ipam;
use crate::portmap::{self, PortSpec};
use crate::store::{Locked, Store};

/// A container found by id or address: its id and addresses.
pub struct Target {
    pub id: String,
    pub ip: Ipv4Addr,
    pub ip6: Option<Ipv6Addr>,
}

/// Finds a container by id or by address (IPv4 or IPv6).
pub fn resolve(lock: &Locked<'_>, who: &str) -> Result<Target, CommandError> {
    let leases = ipam::list(lock)?;
    let found = leases.get_key_value(who).or_else(|| match who.parse() {
        Ok(std::net::IpAddr::V4(ip)) => leases.iter().find(|(_, l)| l.ip == ip),
        Ok(std::net::IpAddr::V6(ip)) => leases.iter().find(|(_, l)| l.ip6 == Some(ip)),
        Err(_) => None,
    });
    match found {
        Some((id, l)) => Ok(Target {
            id: id.clone(),
            ip: l.ip,
            ip6: l.ip6,
        }),
        None => Err(CommandError::UnknownContainer(who.to_owned())),
    }
}

fn parse_specs(specs: &[String]) -> Result<Vec<PortSpec>, CommandError> {
    specs
        .iter()
        .map(|s| s.parse().map_err(CommandError::from))
        .collect()
}

pub fn run(g: &GlobalArgs, cmd: &PortCommand) -> Result<(), CommandError> {
    let store = Store::open(&g.state_dir)?;
    let lock = store.lock()?;
    let out = &mut std::io::stdout().lock();
    match cmd {
        PortCommand::Add { container, specs } => {
            let specs = parse_specs(specs)?;
            let Target { id, ip, ip6 } = resolve(&lock, container)?;
            let dp = Datapath::open_required(&g.bpffs_dir)?;
            let added = portmap::add(&lock, &dp, &id, ip, ip6, &specs)?;
            if g.json {
                return super::print_json(out, &serde_json::json!({ "added": added }));
            }
            writeln!(out, "added {} port forward(s) to {id} ({ip})", added.len())
                .map_err(CommandError::Output)?;
        }
        PortCommand::Rm { container, specs } => {
            let specs = parse_specs(specs)?;
            let owner = if container == "-" {
                None
            } else {
                Some(resolve(&lock, container)?.id)
            };
            let table = portmap::load_table(&lock)?;
            let doomed = portmap::select(&table, &specs, owner.as_deref())?;
            let dp = Datapath::open(&g.bpffs_dir)?;
            portmap::remove(&lock, dp.as_ref(), &doomed)?;
            if g.json {
                return super::print_json(out, &serde_json::json!({ "removed": doomed }));
            }
            writeln!(out, "removed {} port forward(s)", doomed.len())
                .map_err(CommandError::Output)?;
        }
        PortCommand::Ls => {
            let mut table = portmap::load_table(&lock)?;
            table.sort_by_key(|m| (m.host_port, m.proto as u8, m.family, m.host_ip, m.host_ip6));
            if g.json {
                serde_json::to_writer_pretty(&mut *out, &table)
                    .map_err(|e| CommandError::Output(e.into()))?;
                writeln!(out).map_err(CommandError::Output)?;
            } else {
                writeln!(
                    out,
                    "{:<6} {:<26} {:<40} CONTAINER",
                    "PROTO", "HOST", "TARGET"
                )
                .map_err(CommandError::Output)?;
                for m in &table {
                    let host = match m.family {
                        portmap::Family::Both => format!("*:{}", m.host_port),
                        _ => m.host(),
                    };
                    let mut targets = Vec::new();
                    if m.forwards_v4() {
                        targets.push(format!("{}:{}", m.container_ip, m.container_port));
                    }
                    if let Some(ip6) = m.container_ip6.filter(|_| m.forwards_v6()) {
                        targets.push(format!("[{ip6}]:{}", m.container_port));
                    }
                    let target = targets.join(", ");
                    writeln!(
                        out,
                        "{:<6} {host:<26} {target:<40} {}",
                        m.proto.to_string(),
                        m.container_id
                    )
                    .map_err(CommandError::Output)?;
                }
            }
        }
    }
    Ok(())
}
