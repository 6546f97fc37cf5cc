//! The conntrack collector: reconciles the state directory and sweeps idle flows out of
//! the conntrack map every interval, one per state directory (`gc.lock`). It is
//! optional: flows expire in the datapath itself when they are looked up; the collector
//! keeps `netns conntrack ls` tidy and heals leaks without waiting for the next
//! prestart. It runs only when asked: `netns gc --daemon` (a service, see
//! contrib/systemd/netns-gc.service), `netns gc --interval S`, `netns load --follow`.
//! The hook never starts it: engines run hooks under a child subreaper (podman's
//! conmon) that waits for every process the hook leaves behind, forever.

use std::fs::File;
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};

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
    #[error("locking {}", path.display())]
    Lock {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "a collector already runs for {} (it holds {})",
        state_dir.display(),
        state_dir.join(LOCK).display()
    )]
    AlreadyRunning { state_dir: PathBuf },
}

/// The collector's single-instance lock in the state directory.
pub const LOCK: &str = "gc.lock";

/// Takes the collector's lock: gc.lock in the state directory (the directory is made
/// if missing, 0700; the file 0600), held until the returned value is dropped;
/// [`CollectorError::AlreadyRunning`] if another collector holds it.
pub fn lock(cfg: &NetConfig) -> Result<Flock<File>, CollectorError> {
    Store::open(&cfg.state_dir)?;
    let path = cfg.state_dir.join(LOCK);
    let lock_err = |source| CollectorError::Lock {
        path: path.clone(),
        source,
    };
    let f = File::options()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(&path)
        .map_err(lock_err)?;
    // An older file (or umask games) may have left it wider.
    f.set_permissions(std::fs::Permissions::from_mode(0o600))
        .map_err(lock_err)?;
    match Flock::lock(f, FlockArg::LockExclusiveNonblock) {
        Ok(held) => Ok(held),
        Err((_, Errno::EWOULDBLOCK)) => Err(CollectorError::AlreadyRunning {
            state_dir: cfg.state_dir.clone(),
        }),
        Err((_, e)) => Err(lock_err(e.into())),
    }
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
    run(cfg, every, true)
}

/// The service (`netns gc --daemon`): like [`collect`], but it never exits by itself.
/// Without a datapath (none loaded yet, or unloaded) it reconciles only and waits for
/// one. Take [`lock`] first: one collector per state directory.
pub fn serve(cfg: &NetConfig, every: Duration) -> Result<(), CollectorError> {
    log::info!(
        "collector for {}: every {} s",
        cfg.state_dir.display(),
        every.as_secs()
    );
    run(cfg, every, false)
}

fn run(cfg: &NetConfig, every: Duration, until_gone: bool) -> Result<(), CollectorError> {
    let mut last: Option<Instant> = None;
    loop {
        let dp = Datapath::open(&cfg.bpffs_dir)?;
        if dp.is_none() && until_gone {
            log::info!(
                "datapath under {} is gone: collector exits",
                cfg.bpffs_dir.display()
            );
            return Ok(());
        }
        if last.is_none_or(|l| l.elapsed() >= every) {
            round(cfg, dp.as_ref());
            last = Some(Instant::now());
        }
        drop(dp);
        std::thread::sleep(Duration::from_secs(1).min(every));
    }
}

/// One round: reconcile, then sweep (if a datapath is loaded). Failures are logged; the
/// next round retries.
fn round(cfg: &NetConfig, dp: Option<&Datapath>) {
    match reconcile_once(cfg) {
        Ok(Some(r)) => {
            for l in r.lines() {
                log::warn!("reconciled: {l}");
            }
        }
        Ok(None) => {}
        Err(e) => log::warn!("reconcile failed: {}", crate::error_chain(&e)),
    }
    let Some(dp) = dp else { return };
    match gc::sweep(dp, gc::monotonic_ns()) {
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
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_lock_per_state_directory() {
        use clap::Parser as _;
        let tmp = tempfile::tempdir().unwrap();
        let state = tmp.path().join("state");
        let cli =
            crate::cli::Cli::try_parse_from(["netns", "--state-dir", state.to_str().unwrap()])
                .unwrap();
        let cfg = cli.global.net_config();
        // Made with the state directory, 0600.
        let held = lock(&cfg).unwrap();
        let mode = std::fs::metadata(state.join(LOCK))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let e = lock(&cfg).unwrap_err();
        assert!(matches!(e, CollectorError::AlreadyRunning { .. }), "{e}");
        assert!(e.to_string().contains("already runs"), "{e}");
        drop(held);
        lock(&cfg).unwrap();
    }
}
