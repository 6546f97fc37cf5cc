//! `netns datapath status|reload|check|unload`.

use std::io::Write as _;

use super::CommandError;
use crate::cli::{DatapathCommand, GlobalArgs};
use crate::datapath::{Datapath, DatapathError, Status};
use crate::host;
use crate::network::{self, Netlink};

/// `netns datapath status` as text.
fn write_status(out: &mut impl std::io::Write, st: &Status) -> std::io::Result<()> {
    writeln!(
        out,
        "pinned under {} (layout v{})",
        st.pins.display(),
        st.layout_version
    )?;
    writeln!(
        out,
        "fast path: {}; flows per container: {}; flow counters: {}",
        if st.fast_path {
            "on (translated packets bypass the host stack and netfilter FORWARD)"
        } else {
            "off"
        },
        match st.ct_max_per_container {
            0 => "no limit".to_owned(),
            n => n.to_string(),
        },
        if st.ct_counters { "on" } else { "off" }
    )?;
    let list = |v: &[String]| {
        if v.is_empty() {
            "none".to_owned()
        } else {
            v.join(", ")
        }
    };
    writeln!(out, "allow inbound from: {}", list(&st.allow_inbound))?;
    writeln!(out, "no masquerade to: {}", list(&st.no_masquerade))?;
    match (&st.ipv6.gateway, &st.ipv6.uplink_addr) {
        (None, _) => writeln!(out, "IPv6: off")?,
        (Some(g), Some(up)) => writeln!(out, "IPv6: on, gateway {g}, NAT66 source {up}")?,
        (Some(g), None) => writeln!(
            out,
            "IPv6: on, gateway {g}, no NAT66 source (the uplink has no global IPv6 address: container IPv6 to the outside is dropped)"
        )?,
    }
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
        DatapathCommand::Status => {
            let st = Datapath::open_required(&g.bpffs_dir)?.status()?;
            if g.json {
                super::print_json(out, &st)?;
            } else {
                write_status(out, &st).map_err(CommandError::Output)?;
            }
        }
        DatapathCommand::Reload => {
            let dp = Datapath::open_required(&g.bpffs_dir)?;
            let replaced = dp.reload()?;
            if g.json {
                return super::print_json(out, &serde_json::json!({ "switched": replaced }));
            }
            writeln!(
                out,
                "reloaded: {} link(s) switched to the new programs, maps kept",
                replaced.len()
            )
            .map_err(CommandError::Output)?;
        }
        DatapathCommand::Check => {
            let dp = Datapath::open_required(&g.bpffs_dir)?;
            let cfg = g.net_config();
            let h = network::runtime()?.block_on(async {
                let nl = Netlink::current()?;
                Ok::<_, CommandError>(host::prepare(&cfg, &nl).await?)
            })?;
            let dcfg = host::datapath_config(&cfg, &h.uplink, &h.bridge);
            let report = dp.check(&dcfg, host::cgroup(&cfg)?.as_deref())?;
            if g.json {
                super::print_json(out, &report)?;
            } else if report.repaired.is_empty() && report.failed.is_empty() {
                writeln!(out, "ok: every program is attached").map_err(CommandError::Output)?;
            }
            for r in report.repaired.iter().filter(|_| !g.json) {
                writeln!(out, "repaired: {r}").map_err(CommandError::Output)?;
            }
            for f in report.failed.iter().filter(|_| !g.json) {
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
            let removed = match Datapath::open(&g.bpffs_dir)? {
                Some(dp) => {
                    let root = dp.pins().root().to_owned();
                    dp.unload()?;
                    Some(root)
                }
                None => None,
            };
            let mut bridge_deleted = false;
            if *delete_bridge {
                bridge_deleted = network::runtime()?.block_on(async {
                    let nl = Netlink::current()?;
                    match nl.link_by_name(&g.bridge).await? {
                        Some(l) => nl.del_link(l.index).await,
                        None => Ok(false),
                    }
                })?;
            }
            if g.json {
                return super::print_json(
                    out,
                    &serde_json::json!({ "removed": removed, "bridge_deleted": bridge_deleted }),
                );
            }
            match removed {
                Some(root) => writeln!(out, "unloaded: removed {}", root.display()),
                None => writeln!(out, "nothing pinned under {}", g.bpffs_dir.display()),
            }
            .map_err(CommandError::Output)?;
            if bridge_deleted {
                writeln!(out, "deleted bridge {}", g.bridge).map_err(CommandError::Output)?;
            }
        }
    }
    Ok(())
}
