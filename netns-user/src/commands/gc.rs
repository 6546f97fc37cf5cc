//! `netns gc [--json] [--interval S] [--daemon] [--timeouts k=v,...]`: sweep conntrack
//! (expired and stale flows, orphan halves, dangling copies, per-container counts: see
//! [`gc::sweep`]) and reconcile the state directory ([`crate::reconcile`], full mode), once, or
//! every S seconds until the datapath is gone (`--interval`), or as the collector service
//! (`--daemon`: every `--interval` or `--gc-interval` seconds, in the foreground, until
//! stopped). Both loops take gc.lock: one collector per state directory.

use std::io::Write as _;
use std::time::Duration;

use netns_common::Timeouts;
use serde::Serialize;

use super::CommandError;
use crate::cli::{GcArgs, GlobalArgs};
use crate::collector;
use crate::datapath::{Datapath, gc};
use crate::reconcile;

/// Parses `key=seconds,...` over `base`.
pub fn parse_timeouts(s: &str, mut base: Timeouts) -> Result<Timeouts, CommandError> {
    for kv in s.split(',').filter(|p| !p.trim().is_empty()) {
        let (k, v) = kv
            .split_once('=')
            .ok_or_else(|| CommandError::Timeouts(format!("{kv:?}: expected KEY=SECONDS")))?;
        let v: u32 = v
            .trim()
            .parse()
            .map_err(|_| CommandError::Timeouts(format!("{kv:?}: not a number of seconds")))?;
        let slot = match k.trim() {
            "tcp_syn" => &mut base.tcp_syn,
            "tcp_established" => &mut base.tcp_established,
            "tcp_fin" => &mut base.tcp_fin,
            "tcp_close" => &mut base.tcp_close,
            "udp" => &mut base.udp,
            "udp_stream" => &mut base.udp_stream,
            "icmp" => &mut base.icmp,
            "generic" => &mut base.generic,
            other => return Err(CommandError::Timeouts(format!("unknown timeout {other:?}"))),
        };
        *slot = v;
    }
    Ok(base)
}

/// One sweep's result.
#[derive(Debug, Serialize)]
struct SweepReport {
    /// None if no datapath is loaded.
    conntrack: Option<gc::GcReport>,
    /// None if the state directory does not exist.
    reconcile: Option<reconcile::Report>,
}

pub fn run(g: &GlobalArgs, a: &GcArgs) -> Result<(), CommandError> {
    let cfg = g.net_config();
    if let Some(t) = &a.timeouts {
        let dp = Datapath::open_required(&g.bpffs_dir)?;
        let t = parse_timeouts(t, dp.config()?.timeouts)?;
        dp.set_timeouts(t)?;
    }
    // --daemon sweeps every --interval, or else every --gc-interval.
    let interval = a.interval.or(a.daemon.then_some(u64::from(g.gc_interval)));
    let Some(interval) = interval else {
        let reconcile = collector::reconcile_once(&cfg)?;
        let conntrack = match Datapath::open(&g.bpffs_dir)? {
            Some(dp) => Some(gc::sweep(&dp, gc::monotonic_ns() + now_offset_ns(a))?),
            None => None,
        };
        let rep = SweepReport {
            conntrack,
            reconcile,
        };
        let out = &mut std::io::stdout().lock();
        if g.json {
            serde_json::to_writer_pretty(&mut *out, &rep)
                .map_err(|e| CommandError::Output(e.into()))?;
            writeln!(out).map_err(CommandError::Output)?;
            return Ok(());
        }
        match rep.conntrack {
            Some(r) => writeln!(
                out,
                "{} entries, {} flows expired, {} stale, {} orphans purged ({} entries and {} \
                 copies deleted, {} refreshed since the walk and kept, {} counts corrected)",
                r.entries,
                r.expired,
                r.stale,
                r.orphans,
                r.deleted,
                r.copies,
                r.refreshed,
                r.recounted
            ),
            None => writeln!(
                out,
                "no datapath under {}: no conntrack to collect",
                g.bpffs_dir.display()
            ),
        }
        .map_err(CommandError::Output)?;
        match &rep.reconcile {
            Some(r) if !r.is_empty() => {
                for l in r.lines() {
                    writeln!(out, "reconciled: {l}").map_err(CommandError::Output)?;
                }
            }
            _ => writeln!(out, "nothing to reconcile").map_err(CommandError::Output)?,
        }
        if let Some(r) = &rep.reconcile
            && !r.failures.is_empty()
        {
            return Err(CommandError::ReconcileIncomplete(r.failures.len()));
        }
        return Ok(());
    };
    let every = Duration::from_secs(interval.max(1));
    let _held = collector::lock(&cfg)?;
    if a.daemon {
        Ok(collector::serve(&cfg, every)?)
    } else {
        Ok(collector::collect(&cfg, every)?)
    }
}

/// How far ahead of the clock a one-shot sweep looks (`--now-offset`, test builds).
fn now_offset_ns(a: &GcArgs) -> u64 {
    #[cfg(feature = "fault-injection")]
    {
        a.now_offset.unwrap_or(0).saturating_mul(1_000_000_000)
    }
    #[cfg(not(feature = "fault-injection"))]
    {
        let _ = a;
        0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timeouts_parse() {
        let t = parse_timeouts("tcp_established=5, udp=2", Timeouts::default()).unwrap();
        assert_eq!((t.tcp_established, t.udp, t.tcp_syn), (5, 2, 120));
        let t = parse_timeouts("generic=60", Timeouts::default()).unwrap();
        assert_eq!((t.generic, t.icmp), (60, 30));
        assert!(parse_timeouts("tcp=1", Timeouts::default()).is_err());
        assert!(parse_timeouts("udp=x", Timeouts::default()).is_err());
        assert!(parse_timeouts("udp", Timeouts::default()).is_err());
    }
}
