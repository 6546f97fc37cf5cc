//! `netns gc [--interval S [--daemon]] [--timeouts k=v,...]`: expire conntrack entries.

use std::fs::File;
use std::os::unix::fs::OpenOptionsExt as _;
use std::io::Write as _;
use std::time::Duration;

use netns_common::Timeouts;
use nix::fcntl::{Flock, FlockArg};

use super::CommandError;
use crate::cli::{GcArgs, GlobalArgs};
use crate::datapath::{Datapath, gc};

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
            "gc_interval" => &mut base.gc_interval,
            other => return Err(CommandError::Timeouts(format!("unknown timeout {other:?}"))),
        };
        *slot = v;
    }
    Ok(base)
}

/// The collector's single-instance lock in the state directory.
pub const LOCK: &str = "gc.lock";

/// Starts `netns gc --interval N --daemon` unless one already runs for this state
/// directory. Its stdio is /dev/null: runc waits for the hook's pipes to close.
pub fn spawn_collector(g: &GlobalArgs) -> std::io::Result<()> {
    let lock_path = g.state_dir.join(LOCK);
    let f = File::options().create(true).append(true).mode(0o600).open(&lock_path)?;
    if Flock::lock(f, FlockArg::LockExclusiveNonblock).is_err() {
        return Ok(()); // one is running
    }
    let exe = std::env::current_exe()?;
    let mut child = std::process::Command::new(exe)
        .arg("--state-dir")
        .arg(&g.state_dir)
        .arg("--bpffs-dir")
        .arg(&g.bpffs_dir)
        .args(["gc", "--daemon", "--interval", &g.gc_interval.to_string()])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()?;
    // It forks into the background and its first process exits at once.
    child.wait()?;
    Ok(())
}

pub fn run(g: &GlobalArgs, a: &GcArgs) -> Result<(), CommandError> {
    let dp = Datapath::open_required(&g.bpffs_dir)?;
    if let Some(t) = &a.timeouts {
        let t = parse_timeouts(t, dp.config()?.timeouts)?;
        dp.set_timeouts(t)?;
    }
    let Some(interval) = a.interval else {
        let r = gc::sweep(&dp, gc::monotonic_ns())?;
        let out = &mut std::io::stdout().lock();
        writeln!(
            out,
            "{} entries, {} flows expired, {} orphans purged",
            r.entries, r.expired, r.orphans
        )
        .map_err(CommandError::Output)?;
        return Ok(());
    };
    drop(dp);
    if a.daemon {
        nix::unistd::daemon(false, false).map_err(|e| CommandError::Daemon(e.into()))?;
    }
    // One collector per state directory.
    let f = File::options()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(g.state_dir.join(LOCK))
        .map_err(CommandError::Daemon)?;
    let Ok(_held) = Flock::lock(f, FlockArg::LockExclusiveNonblock) else {
        log::info!("a collector already runs for {}", g.state_dir.display());
        return Ok(());
    };
    gc::run(&g.bpffs_dir, Some(Duration::from_secs(interval.max(1))))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timeouts_parse() {
        let t = parse_timeouts("tcp_established=5, udp=2", Timeouts::default()).unwrap();
        assert_eq!((t.tcp_established, t.udp, t.tcp_syn), (5, 2, 120));
        assert!(parse_timeouts("tcp=1", Timeouts::default()).is_err());
        assert!(parse_timeouts("udp=x", Timeouts::default()).is_err());
        assert!(parse_timeouts("udp", Timeouts::default()).is_err());
    }
}
