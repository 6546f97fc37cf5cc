//! `netns gc [--json] [--interval S [--daemon]] [--timeouts k=v,...]`: expire conntrack
//! entries and reconcile the state directory ([`crate::reconcile`], full mode), once or
//! every S seconds (the collector the hook starts).

use std::fs::File;
use std::io::Write as _;
use std::os::fd::{AsRawFd as _, FromRawFd as _, RawFd};
use std::os::unix::fs::{MetadataExt as _, OpenOptionsExt as _, PermissionsExt as _};
use std::os::unix::process::CommandExt as _;
use std::time::Duration;

use netns_common::Timeouts;
use serde::Serialize;

use super::CommandError;
use crate::cli::{GcArgs, GlobalArgs};
use crate::datapath::{Datapath, gc};
use crate::network::{self, Netlink};
use crate::reconcile;
use crate::store::Store;

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
            "gc_interval" => &mut base.gc_interval,
            other => return Err(CommandError::Timeouts(format!("unknown timeout {other:?}"))),
        };
        *slot = v;
    }
    Ok(base)
}

/// The collector's single-instance lock in the state directory.
pub const LOCK: &str = "gc.lock";

/// Environment variable telling a collector the hook handed it the already locked
/// gc.lock as this file descriptor (so exactly one collector is ever started).
const LOCK_FD_ENV: &str = "NETNS_GC_LOCK_FD";
/// The descriptor number the lock is handed over as.
const LOCK_FD: RawFd = 3;

fn open_lock(g: &GlobalArgs) -> std::io::Result<File> {
    let f = File::options()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(g.state_dir.join(LOCK))?;
    // An older file (or umask games) may have left it wider.
    f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    Ok(f)
}

/// flock(LOCK_EX | LOCK_NB) on the open file description. Not nix's `Flock`, whose drop
/// unlocks: a lock handed to a child must survive the parent closing its descriptor.
fn try_lock(f: &File) -> std::io::Result<bool> {
    // SAFETY: flock on a descriptor this File owns.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
        return Ok(true);
    }
    let e = std::io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
        Ok(false)
    } else {
        Err(e)
    }
}

/// Starts `netns gc --interval N --daemon` unless one already runs for this state
/// directory. The hook takes gc.lock itself and hands the locked descriptor to the
/// collector, so parallel hooks never start a second one, not even briefly. Its stdio
/// is /dev/null: runc waits for the hook's pipes to close.
pub fn spawn_collector(g: &GlobalArgs) -> std::io::Result<()> {
    let f = open_lock(g)?;
    if !try_lock(&f)? {
        return Ok(()); // one is running
    }
    let fd = f.as_raw_fd();
    let exe = std::env::current_exe()?;
    let mut cmd = std::process::Command::new(exe);
    cmd.arg("--state-dir")
        .arg(&g.state_dir)
        .arg("--bpffs-dir")
        .arg(&g.bpffs_dir)
        .arg("--bridge")
        .arg(&g.bridge)
        .args(["gc", "--daemon", "--interval", &g.gc_interval.to_string()])
        .env(LOCK_FD_ENV, LOCK_FD.to_string())
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    // SAFETY: only async-signal-safe calls (fcntl, dup2, close_range) between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            let r = if fd == LOCK_FD {
                libc::fcntl(fd, libc::F_SETFD, 0)
            } else {
                libc::dup2(fd, LOCK_FD)
            };
            if r < 0 {
                return Err(std::io::Error::last_os_error());
            }
            // Nothing else of the hook's (or runc's) leaks into the long-lived process.
            libc::syscall(libc::SYS_close_range, LOCK_FD + 1, u32::MAX, 0);
            Ok(())
        });
    }
    let mut child = cmd.spawn()?;
    // It forks into the background and its first process exits at once. Our copy of
    // the descriptor closes on return; the collector's keeps the lock.
    child.wait()?;
    Ok(())
}

/// The collector's lock: the descriptor a hook handed over (checked to be gc.lock),
/// or gc.lock taken here; None if another collector holds it.
fn collector_lock(g: &GlobalArgs) -> std::io::Result<Option<File>> {
    if let Some(fd) = std::env::var(LOCK_FD_ENV)
        .ok()
        .and_then(|v| v.parse::<RawFd>().ok())
    {
        // SAFETY: removing our own variable before any thread is started.
        unsafe { std::env::remove_var(LOCK_FD_ENV) };
        let path = g.state_dir.join(LOCK);
        // SAFETY: fstat only reads into the zeroed struct.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        let is_lock = unsafe { libc::fstat(fd, &mut st) } == 0
            && std::fs::metadata(&path)
                .is_ok_and(|m| (m.dev(), m.ino()) == (st.st_dev as u64, st.st_ino as u64));
        if is_lock {
            // SAFETY: the descriptor was dup2'd for us by the hook and nothing else in
            // this process owns it (checked to be gc.lock above).
            let f = unsafe { File::from_raw_fd(fd) };
            // SAFETY: fcntl on a descriptor we own.
            unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
            // Same open file description: this only confirms the hook's lock.
            return Ok(try_lock(&f)?.then_some(f));
        }
        log::warn!(
            "{LOCK_FD_ENV}={fd} is not {}: locking it here",
            path.display()
        );
    }
    let f = open_lock(g)?;
    Ok(try_lock(&f)?.then_some(f))
}

/// One sweep's result.
#[derive(Debug, Serialize)]
struct SweepReport {
    /// None if no datapath is loaded.
    conntrack: Option<gc::GcReport>,
    /// None if the state directory does not exist.
    reconcile: Option<reconcile::Report>,
}

/// A full reconcile of the state directory (None if it does not exist).
pub fn reconcile_once(g: &GlobalArgs) -> Result<Option<reconcile::Report>, CommandError> {
    let Some(store) = Store::open_existing(&g.state_dir)? else {
        return Ok(None);
    };
    let lock = store.lock()?;
    let rt = network::runtime()?;
    let r = rt.block_on(async {
        let nl = Netlink::current()?;
        reconcile::run(g, &lock, &nl, reconcile::Mode::Full).await
    })?;
    Ok(Some(r))
}

pub fn run(g: &GlobalArgs, a: &GcArgs) -> Result<(), CommandError> {
    if let Some(t) = &a.timeouts {
        let dp = Datapath::open_required(&g.bpffs_dir)?;
        let t = parse_timeouts(t, dp.config()?.timeouts)?;
        dp.set_timeouts(t)?;
    }
    let Some(interval) = a.interval else {
        let reconcile = reconcile_once(g)?;
        let conntrack = match Datapath::open(&g.bpffs_dir)? {
            Some(dp) => Some(gc::sweep(&dp, gc::monotonic_ns())?),
            None => None,
        };
        let rep = SweepReport {
            conntrack,
            reconcile,
        };
        let out = &mut std::io::stdout().lock();
        if a.json {
            serde_json::to_writer_pretty(&mut *out, &rep)
                .map_err(|e| CommandError::Output(e.into()))?;
            writeln!(out).map_err(CommandError::Output)?;
            return Ok(());
        }
        match rep.conntrack {
            Some(r) => writeln!(
                out,
                "{} entries, {} flows expired, {} orphans purged",
                r.entries, r.expired, r.orphans
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
    // Before daemon(): the handed-over descriptor is checked while stdio still works.
    let held = collector_lock(g).map_err(CommandError::Daemon)?;
    if a.daemon {
        nix::unistd::daemon(false, false).map_err(|e| CommandError::Daemon(e.into()))?;
    }
    // One collector per state directory.
    let Some(_held) = held else {
        log::info!("a collector already runs for {}", g.state_dir.display());
        return Ok(());
    };
    collect(g, Duration::from_secs(interval.max(1)))
}

/// Every `every`: reconcile the state directory, then expire conntrack entries; until
/// the datapath's pins disappear (unloaded, or a test's bpffs directory removed),
/// checking for that every second.
pub(crate) fn collect(g: &GlobalArgs, every: Duration) -> Result<(), CommandError> {
    let mut last: Option<std::time::Instant> = None;
    loop {
        let Some(dp) = Datapath::open(&g.bpffs_dir)? else {
            log::info!(
                "datapath under {} is gone: collector exits",
                g.bpffs_dir.display()
            );
            return Ok(());
        };
        if last.is_none_or(|l| l.elapsed() >= every) {
            match reconcile_once(g) {
                Ok(Some(r)) => {
                    for l in r.lines() {
                        log::warn!("reconciled: {l}");
                    }
                }
                Ok(None) => {}
                Err(e) => log::warn!("reconcile failed: {}", crate::error_chain(&e)),
            }
            match gc::sweep(&dp, gc::monotonic_ns()) {
                Ok(r) if r.expired + r.orphans > 0 => log::info!(
                    "gc: {} entries, {} flows expired, {} orphans purged",
                    r.entries,
                    r.expired,
                    r.orphans
                ),
                Ok(_) => {}
                // The pins can vanish mid-sweep; the next round notices.
                Err(e) => log::warn!("gc sweep failed: {e}"),
            }
            last = Some(std::time::Instant::now());
        }
        drop(dp);
        std::thread::sleep(Duration::from_secs(1).min(every));
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
