//! `netns datapath status|reload|check|unload`.

use std::io::Write as _;

use serde::Serialize;

use super::CommandError;
use crate::cgroup;
use crate::cli::{DatapathCommand, GlobalArgs};
use crate::datapath::{Datapath, LinkStatus, MapStatus};
use crate::network::{self, Netlink};

#[derive(Serialize)]
struct Status {
    pins: String,
    layout_version: u32,
    programs: Vec<String>,
    links: Vec<LinkStatus>,
    maps: Vec<MapStatus>,
}

pub fn run(g: &GlobalArgs, cmd: &DatapathCommand) -> Result<(), CommandError> {
    let out = &mut std::io::stdout().lock();
    match cmd {
        DatapathCommand::Status { json } => {
            let dp = Datapath::open_required(&g.bpffs_dir)?;
            let st = Status {
                pins: dp.pins().root().display().to_string(),
                layout_version: netns_common::LAYOUT_VERSION,
                programs: dp.program_status()?,
                links: dp.link_status()?,
                maps: dp.map_status()?,
            };
            if *json {
                serde_json::to_writer_pretty(&mut *out, &st)
                    .map_err(|e| CommandError::Output(e.into()))?;
                writeln!(out).map_err(CommandError::Output)?;
            } else {
                let w = |out: &mut std::io::StdoutLock<'_>, s: String| {
                    writeln!(out, "{s}").map_err(CommandError::Output)
                };
                w(
                    out,
                    format!("pinned under {} (layout v{})", st.pins, st.layout_version),
                )?;
                w(out, "programs:".into())?;
                for p in &st.programs {
                    w(out, format!("  {p}"))?;
                }
                w(out, "links:".into())?;
                for l in &st.links {
                    let state = if l.attach == "cgroup" || l.ifindex != 0 {
                        "attached"
                    } else {
                        "DETACHED"
                    };
                    w(
                        out,
                        format!(
                            "  {:<22} {:<12} ifindex {:<4} {state:<9} {}",
                            l.program,
                            l.attach,
                            l.ifindex,
                            l.pin.display()
                        ),
                    )?;
                }
                w(out, "maps:".into())?;
                for m in &st.maps {
                    w(
                        out,
                        format!(
                            "  {:<14} {:>8} / {:<8} {}",
                            m.name,
                            m.entries,
                            m.max_entries,
                            m.pin.display()
                        ),
                    )?;
                }
            }
        }
        DatapathCommand::Reload => {
            let dp = Datapath::open_required(&g.bpffs_dir)?;
            let replaced = dp.reload()?;
            writeln!(
                out,
                "reloaded: {} link(s) switched to the new programs, maps kept",
                replaced.len()
            )
            .map_err(CommandError::Output)?;
        }
        DatapathCommand::Check => {
            let dp = Datapath::open_required(&g.bpffs_dir)?;
            let cfg = super::load::prepare_host(g)?;
            let cg = cgroup::resolve(&g.cgroup)?;
            let repaired = dp.check(&cfg, cg.as_deref())?;
            if repaired.is_empty() {
                writeln!(out, "ok: every program is attached").map_err(CommandError::Output)?;
            }
            for r in repaired {
                writeln!(out, "repaired: {r}").map_err(CommandError::Output)?;
            }
        }
        DatapathCommand::Unload { delete_bridge } => {
            match Datapath::open(&g.bpffs_dir)? {
                Some(dp) => {
                    let root = dp.pins().root().display().to_string();
                    dp.unload()?;
                    writeln!(out, "unloaded: removed {root}").map_err(CommandError::Output)?;
                }
                None => writeln!(out, "nothing pinned under {}", g.bpffs_dir.display())
                    .map_err(CommandError::Output)?,
            }
            if *delete_bridge {
                let rt = network::runtime()?;
                let deleted = rt.block_on(async {
                    let nl = Netlink::current()?;
                    match nl.link_by_name(&g.bridge).await? {
                        Some(l) => nl.del_link(l.index).await,
                        None => Ok(false),
                    }
                })?;
                if deleted {
                    writeln!(out, "deleted bridge {}", g.bridge).map_err(CommandError::Output)?;
                }
            }
        }
    }
    Ok(())
}
