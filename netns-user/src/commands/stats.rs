//! `netns stats [--json]`: translation counters and drops by reason.

use std::io::Write as _;

use super::CommandError;
use crate::cli::GlobalArgs;
use crate::datapath::Datapath;

pub fn run(g: &GlobalArgs, json: bool) -> Result<(), CommandError> {
    let dp = Datapath::open_required(&g.bpffs_dir)?;
    let stats = dp.stats()?;
    let out = &mut std::io::stdout().lock();
    if json {
        let m: serde_json::Map<String, serde_json::Value> = stats
            .iter()
            .map(|(s, v)| (s.name().to_owned(), (*v).into()))
            .collect();
        serde_json::to_writer_pretty(&mut *out, &m).map_err(|e| CommandError::Output(e.into()))?;
        writeln!(out).map_err(CommandError::Output)?;
    } else {
        for (s, v) in stats {
            let kind = if s.is_drop() { "drop" } else { "" };
            writeln!(out, "{:<24} {v:>12} {kind}", s.name()).map_err(CommandError::Output)?;
        }
    }
    Ok(())
}
