//! The conntrack collector: expires idle flows and reconciles the state directory every
//! interval, one per state directory (`gc.lock`). `netns gc --interval S --daemon`
//! runs it; the hook starts one with [`spawn`].

use std::fs::File;
use std::os::fd::{AsRawFd as _, FromRawFd as _, RawFd};
use std::os::unix::fs::{MetadataExt as _, OpenOptionsExt as _, PermissionsExt as _};
use std::os::unix::process::CommandExt as _;
use std::time::Duration;

use crate::config::NetConfig;
use crate::datapath::{Datapath, DatapathError, gc};
use crate::network::{self, Netlink, NetworkError};
use crate::reconcile::{self, ReconcileError};
use crate::store::{Store, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum CollectorError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Network(#[from] NetworkError),
    #[error(transparent)]
    Netlink(#[from] network::NetlinkError),
    #[error(transparent)]
    Reconcile(#[from] ReconcileError),
    #[error(transparent)]
    Datapath(#[from] DatapathError),
}

/// The collector's single-instance lock in the state directory.
pub const LOCK: &str = "gc.lock";

/// Environment variable telling a collector the hook handed it the already locked
/// gc.lock as this file descriptor (so exactly one collector is ever started).
const LOCK_FD_ENV: &str = "NETNS_GC_LOCK_FD";
/// The descriptor number the lock is handed over as.
const LOCK_FD: RawFd = 3;

fn open_lock(cfg: &NetConfig) -> std::io::Result<File> {
    let f = File::options()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(cfg.state_dir.join(LOCK))?;
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
pub fn spawn(cfg: &NetConfig) -> std::io::Result<()> {
    let f = open_lock(cfg)?;
    if !try_lock(&f)? {
        return Ok(()); // one is running
    }
    let fd = f.as_raw_fd();
    let exe = std::env::current_exe()?;
    let mut cmd = std::process::Command::new(exe);
    cmd.arg("--state-dir")
        .arg(&cfg.state_dir)
        .arg("--bpffs-dir")
        .arg(&cfg.bpffs_dir)
        .arg("--bridge")
        .arg(&cfg.bridge)
        .args(["gc", "--daemon", "--interval", &cfg.gc_interval.to_string()])
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
pub fn lock(cfg: &NetConfig) -> std::io::Result<Option<File>> {
    if let Some(fd) = std::env::var(LOCK_FD_ENV)
        .ok()
        .and_then(|v| v.parse::<RawFd>().ok())
    {
        // SAFETY: removing our own variable before any thread is started.
        unsafe { std::env::remove_var(LOCK_FD_ENV) };
        let path = cfg.state_dir.join(LOCK);
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
    let f = open_lock(cfg)?;
    Ok(try_lock(&f)?.then_some(f))
}

/// A full reconcile of the state directory (None if it does not exist).
pub fn reconcile_once(cfg: &NetConfig) -> Result<Option<reconcile::Report>, CollectorError> {
    let Some(store) = Store::open_existing(&cfg.state_dir)? else {
        return Ok(None);
    };
    let lock = store.lock()?;
    let rt = network::runtime()?;
    let r = rt.block_on(async {
        let nl = Netlink::current()?;
        reconcile::run(cfg, &lock, &nl, reconcile::Mode::Full).await
    })?;
    Ok(Some(r))
}

/// Every `every`: reconcile the state directory, then expire conntrack entries; until
/// the datapath's pins disappear (unloaded, or a test's bpffs directory removed),
/// checking for that every second.
pub fn collect(cfg: &NetConfig, every: Duration) -> Result<(), CollectorError> {
    let mut last: Option<std::time::Instant> = None;
    loop {
        let Some(dp) = Datapath::open(&cfg.bpffs_dir)? else {
            log::info!(
                "datapath under {} is gone: collector exits",
                cfg.bpffs_dir.display()
            );
            return Ok(());
        };
        if last.is_none_or(|l| l.elapsed() >= every) {
            match reconcile_once(cfg) {
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
