//! `netns port add|rm|ls`: port forwards, live (no program reload).

use std::io::Write as _;
use std::net::Ipv4Addr;

use super::CommandError;
use crate::cli::{GlobalArgs, PortCommand};
use crate::datapath::Datapath;
use crate::ipam;
use crate::portmap::{self, PortSpec};
use crate::store::{Locked, Store};

/// Finds a container by id or by address.
pub fn resolve(lock: &Locked<'_>, who: &str) -> Result<(String, Ipv4Addr), CommandError> {
    let leases = ipam::list(lock)?;
    if let Some(l) = leases.get(who) {
        return Ok((who.to_owned(), l.ip));
    }
    if let Ok(ip) = who.parse::<Ipv4Addr>()
        && let Some((id, l)) = leases.iter().find(|(_, l)| l.ip == ip)
    {
        return Ok((id.clone(), l.ip));
    }
    Err(CommandError::UnknownContainer(who.to_owned()))
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
            let (id, ip) = resolve(&lock, container)?;
            let dp = Datapath::open_required(&g.bpffs_dir)?;
            let added = portmap::add(&lock, &dp, &id, ip, &specs)?;
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
                Some(resolve(&lock, container)?.0)
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
            table.sort_by_key(|m| (m.host_port, m.proto as u8, m.host_ip));
            if g.json {
                serde_json::to_writer_pretty(&mut *out, &table)
                    .map_err(|e| CommandError::Output(e.into()))?;
                writeln!(out).map_err(CommandError::Output)?;
            } else {
                writeln!(
                    out,
                    "{:<6} {:<22} {:<22} CONTAINER",
                    "PROTO", "HOST", "TARGET"
                )
                .map_err(CommandError::Output)?;
                for m in &table {
                    let host = format!(
                        "{}:{}",
                        m.host_ip.map_or("*".to_owned(), |i| i.to_string()),
                        m.host_port
                    );
                    let target = format!("{}:{}", m.container_ip, m.container_port);
                    writeln!(
                        out,
                        "{:<6} {host:<22} {target:<22} {}",
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
