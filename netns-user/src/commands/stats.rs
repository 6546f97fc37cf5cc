//! `netns stats [--json]`: translation counters and drops by reason.

use std::io::Write as _;

use super::CommandError;
use crate::cli::GlobalArgs;
use crate::datapath::Datapath;

pub fn run(g: &GlobalArgs, json: bool) -> Result<(), CommandError> {
    let dp = Datapath::open_required(&g.bpffs_dir)?;
    let mut stats: Vec<(String, u64, bool)> = dp
        .stats()?
        .into_iter()
        .map(|(s, v)| (s.name().to_owned(), v, s.is_drop()))
        .collect();
    // Both tables: `ct_entries` the main one (assured pairs, the one --ct-max sizes),
    // `ct_entries_unreplied` the other; the copies kept to rebuild lost halves; and the
    // evictions from both.
    let sizes = dp.conntrack_sizes()?;
    stats.push(("ct_entries".into(), sizes.main as u64, false));
    stats.push(("ct_entries_unreplied".into(), sizes.new as u64, false));
    stats.push(("ct_kept".into(), sizes.kept as u64, false));
    let live = (sizes.main + sizes.new) as u64;
    stats.push(("ct_evicted".into(), dp.ct_evictions(live)?, false));
    let out = &mut std::io::stdout().lock();
    if json {
        let m: serde_json::Map<String, serde_json::Value> = stats
            .iter()
            .map(|(s, v, _)| (s.clone(), (*v).into()))
            .collect();
        serde_json::to_writer_pretty(&mut *out, &m).map_err(|e| CommandError::Output(e.into()))?;
        writeln!(out).map_err(CommandError::Output)?;
    } else {
        for (s, v, drop) in stats {
            let kind = if drop { "drop" } else { "" };
            writeln!(out, "{s:<24} {v:>12} {kind}").map_err(CommandError::Output)?;
        }
    }
    Ok(())
}
