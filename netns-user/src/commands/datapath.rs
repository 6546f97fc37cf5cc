//! `netns datapath status|reload|check|unload`.

use std::io::Write as _;

use super::CommandError;
use crate::cgroup;
use crate::cli::{DatapathCommand, GlobalArgs};
use crate::datapath::{Datapath, DatapathError, Status};
use crate::network::{self, Netlink};

/// `netns datapath status` as text.
fn write_status(out: &mut impl std::io::Write, st: &Status) -> std::io::Result<()> {
    writeln!(
        out,
        "pinned under {} (layout v{})",
        st.pins.display(),
        st.layout_version
    )?;
    writeln!(out, "programs:")?;
    for p in &st.programs {
        match (p.id, &p.prog_type) {
            (Some(id), Some(t)) => writeln!(
                out,
                "  {:<22} id {id:<6} {t:<16} {}",
                p.name,
                p.pin.display()
            )?,
            _ => writeln!(out, "  {:<22} MISSING {}", p.name, p.pin.display())?,
        }
    }
    writeln!(out, "links:")?;
    for l in &st.links {
        writeln!(out, "  {l}")?;
    }
    writeln!(out, "maps:")?;
    for m in &st.maps {
        writeln!(
            out,
            "  {:<14} {:>8} / {:<8} {}",
            m.name,
            m.entries,
            m.max_entries,
            m.pin.display()
        )?;
    }
    Ok(())
}

pub fn run(g: &GlobalArgs, cmd: &DatapathCommand) -> Result<(), CommandError> {
    let out = &mut std::io::stdout().lock();
    match cmd {
        DatapathCommand::Status { json } => {
            let st = Datapath::open_required(&g.bpffs_dir)?.status()?;
            if *json {
                serde_json::to_writer_pretty(&mut *out, &st)
                    .map_err(|e| CommandError::Output(e.into()))?;
                writeln!(out).map_err(CommandError::Output)?;
            } else {
                write_status(out, &st).map_err(CommandError::Output)?;
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
            let report = dp.check(&cfg, cg.as_deref())?;
            if report.repaired.is_empty() && report.failed.is_empty() {
                writeln!(out, "ok: every program is attached").map_err(CommandError::Output)?;
            }
            for r in &report.repaired {
                writeln!(out, "repaired: {r}").map_err(CommandError::Output)?;
            }
            for f in &report.failed {
                writeln!(out, "FAILED: {}: {}", f.what, f.error).map_err(CommandError::Output)?;
            }
            if !report.failed.is_empty() {
                return Err(DatapathError::CheckIncomplete {
                    failed: report.failed.len(),
                }
                .into());
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
