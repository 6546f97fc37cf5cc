//! Ctrl-C, SIGTERM and SIGHUP only set a flag (signal-hook): the demo and the benchmark
//! check it between steps and return an error, which unwinds through their RAII guards
//! (namespaces, containers, pins, servers), so everything they made is removed.

use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context as _, bail};
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// Installs the handlers (idempotent: a second call adds handlers that set the same flag).
pub fn install() -> anyhow::Result<()> {
    for s in [SIGINT, SIGTERM, SIGHUP] {
        signal_hook::flag::register(s, &INTERRUPTED)
            .with_context(|| format!("installing a handler for signal {s}"))?;
    }
    Ok(())
}

pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

/// An error once a signal has arrived.
pub fn check() -> anyhow::Result<()> {
    if interrupted() {
        bail!("interrupted");
    }
    Ok(())
}
