//! The OCI hook: reads what runc says about the container and hands it to the
//! container service ([`crate::container`]): prestart sets the network up, poststop
//! tears it down from the persisted lease (the pid and its namespace are usually gone
//! by then). Both phases are idempotent.
//!
//! Every prestart first reconciles leases whose container pid is dead (cheap /proc
//! checks), so leaks heal without anyone running `netns gc`.
//!
//! The hook leaves no process behind: engines run hooks under a child subreaper
//! (podman's conmon), which would wait forever for anything still running. Idle flows
//! expire in the datapath; the conntrack collector is a service of its own
//! (`netns gc --daemon`, [`crate::collector`]), never started from here.
//!
//! Testing aid, only in builds with the `fault-injection` feature:
//! `NETNS_FAIL_AT=<step>` (see [`Step::name`]) makes prestart fail right after that
//! step has done its work and registered its undo, so tests can prove that rollback
//! leaves nothing behind; `NETNS_KILL_AT=<step>` makes the hook SIGKILL itself right
//! after that step (no rollback: what a crash leaves, for reconcile to clean). An
//! unknown step name is an error, so a typo cannot make such a test pass vacuously.

use std::net::Ipv4Addr;

use crate::config::NetConfig;
use crate::container::{self, Faults, Request, SetupError, Step, StepError};
use crate::ipam::{self, IpamError};
use crate::network::{self, Netlink};
use crate::oci::{OciError, Phase, State};
use crate::portmap;
use crate::reconcile;
use crate::store::{Store, StoreError};

/// Environment variable naming the prestart step to fail (testing aid).
pub const FAIL_AT_ENV: &str = "NETNS_FAIL_AT";

/// Environment variable naming the prestart step after which the hook SIGKILLs itself
/// (testing aid: a crash, no rollback).
pub const KILL_AT_ENV: &str = "NETNS_KILL_AT";

#[derive(Debug, thiserror::Error)]
pub enum HookError {
    #[error(transparent)]
    Oci(#[from] OciError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Ipam(#[from] IpamError),
    #[error("{var}={value:?} names no prestart step (steps: {steps})", steps = step_names())]
    UnknownStep { var: &'static str, value: String },
    #[error("container {id}")]
    Setup {
        id: String,
        #[source]
        source: StepError,
    },
    #[error("container {id}: annotation netns.ports")]
    Annotation {
        id: String,
        #[source]
        source: portmap::SpecError,
    },
    #[error("container {id}")]
    Prestart {
        id: String,
        #[source]
        source: SetupError,
    },
    #[error(
        "container {id}: poststop left {failures} item(s) behind; the lease is kept so a retry can finish"
    )]
    Poststop { id: String, failures: usize },
}

fn step_names() -> String {
    Step::ALL.map(Step::name).join(", ")
}

/// Runs the hook for a parsed state.
pub fn run(cfg: &NetConfig, st: &State) -> Result<(), HookError> {
    match st.phase()? {
        Phase::Prestart => prestart(cfg, st),
        Phase::Poststop => poststop(cfg, &st.id),
    }
}

#[cfg(feature = "fault-injection")]
fn step_from_env(var: &'static str) -> Result<Option<Step>, HookError> {
    match std::env::var(var) {
        Ok(s) if s.is_empty() => Ok(None),
        Ok(value) => Step::from_name(&value)
            .map(Some)
            .ok_or(HookError::UnknownStep { var, value }),
        Err(_) => Ok(None),
    }
}

/// The faults the environment asks for (`fault-injection` builds only).
pub fn faults() -> Result<Faults, HookError> {
    #[cfg(feature = "fault-injection")]
    {
        Ok(Faults {
            fail_at: step_from_env(FAIL_AT_ENV)?,
            kill_at: step_from_env(KILL_AT_ENV)?,
        })
    }
    #[cfg(not(feature = "fault-injection"))]
    {
        for var in [FAIL_AT_ENV, KILL_AT_ENV] {
            if std::env::var_os(var).is_some_and(|v| !v.is_empty()) {
                log::warn!("{var} is ignored: this build has no fault injection");
            }
        }
        Ok(Faults::default())
    }
}

pub fn prestart(cfg: &NetConfig, st: &State) -> Result<(), HookError> {
    let faults = faults()?;
    let id = st.id.as_str();
    let pid = st.live_pid()?;
    let setup_err = |source: StepError| HookError::Setup {
        id: id.to_owned(),
        source,
    };
    let ns = network::open_container_netns(pid).map_err(|e| setup_err(e.into()))?;
    // What identifies this container for reconcile: the pid's start time (pid reuse)
    // and its namespace, read after opening the namespace so both are the same process's.
    let netns_ino = ns
        .metadata()
        .map(|m| std::os::unix::fs::MetadataExt::ino(&m))
        .map_err(|source| {
            setup_err(
                network::NetworkError::OpenNetns {
                    pid,
                    path: format!("/proc/{pid}/ns/net"),
                    source,
                }
                .into(),
            )
        })?;
    let pid_start = reconcile::pid_start_time_in(std::path::Path::new("/proc"), pid);
    if pid_start.is_none() {
        log::warn!("container {id}: no start time for pid {pid} in /proc");
    }
    let store = Store::open(&cfg.state_dir)?;
    let lock = store.lock()?;
    let rt = network::runtime().map_err(|e| setup_err(e.into()))?;
    rt.block_on(async {
        let nl = Netlink::current().map_err(|e| setup_err(e.into()))?;
        // Heal what dead containers left (a lost poststop, a killed hook) before
        // allocating: cheap unless something is actually dead.
        match reconcile::run(
            cfg,
            &lock,
            &nl,
            reconcile::Mode::DeadPids { skip: Some(id) },
        )
        .await
        {
            Ok(r) => {
                for l in r.lines() {
                    log::warn!("reconcile: {l}");
                }
            }
            Err(e) => log::warn!(
                "reconcile before prestart failed: {}",
                crate::error_chain(&e)
            ),
        }
        let mut req = Request {
            pid_start,
            netns_ino: Some(netns_ino),
            ..Request::hook(id, pid, &ns)
        };
        if container::already_done(cfg, &lock, &nl, &req)
            .await
            .map_err(setup_err)?
        {
            log::debug!("container {id}: already set up, nothing to do");
            return Ok(());
        }
        // Bad or colliding port forwards fail here, before anything is made. The port-map
        // step validates again (the host's sockets may change in between).
        if let Some(spec) = st.annotations.get(portmap::ANNOTATION) {
            let specs = portmap::parse_list(spec).map_err(|source| HookError::Annotation {
                id: id.to_owned(),
                source,
            })?;
            let new = portmap::expand(
                id,
                Ipv4Addr::UNSPECIFIED,
                portmap::unspecified6(cfg),
                &specs,
            );
            portmap::load_table(&lock)
                .and_then(|t| portmap::validate(&t, &new, true))
                .map_err(|e| setup_err(e.into()))?;
            req.ports = Some(specs);
        }
        let ns_nl = Netlink::in_netns(&ns).map_err(|e| setup_err(e.into()))?;
        network::check_fresh_netns(&ns_nl, pid, &[])
            .await
            .map_err(|e| setup_err(e.into()))?;
        // Uplink first: its MTU is the default, and the datapath needs it.
        let uplink = crate::host::uplink(cfg, &nl)
            .await
            .map_err(|e| setup_err(e.into()))?;
        container::setup(cfg, &lock, &nl, &uplink, req, faults)
            .await
            .map_err(|source| HookError::Prestart {
                id: id.to_owned(),
                source,
            })?;
        Ok(())
    })
}

/// Tears down what prestart made for `id`; an unknown id is not an error.
pub fn poststop(cfg: &NetConfig, id: &str) -> Result<(), HookError> {
    let Some(store) = Store::open_existing(&cfg.state_dir)? else {
        log::debug!(
            "container {id}: no state directory {}: nothing to tear down",
            cfg.state_dir.display()
        );
        return Ok(());
    };
    let lock = store.lock()?;
    let Some(lease) = ipam::get(&lock, id)? else {
        log::debug!("container {id}: no lease: nothing to tear down");
        return Ok(());
    };
    let setup_err = |source: StepError| HookError::Setup {
        id: id.to_owned(),
        source,
    };
    let rt = network::runtime().map_err(|e| setup_err(e.into()))?;
    let failures = rt.block_on(async {
        let nl = Netlink::current().map_err(|e| setup_err(e.into()))?;
        Ok::<_, HookError>(container::teardown(cfg, &lock, id, &lease, &nl).await)
    })?;
    if failures > 0 {
        return Err(HookError::Poststop {
            id: id.to_owned(),
            failures,
        });
    }
    ipam::release(&lock, id)?;
    log::debug!("container {id}: released {}", lease.ip);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_step_names_list_the_steps() {
        let e = HookError::UnknownStep {
            var: KILL_AT_ENV,
            value: "nope".into(),
        };
        assert!(e.to_string().contains("datapath-load"), "{e}");
    }

    #[test]
    fn poststop_of_unknown_container_is_fine() {
        use clap::Parser as _;
        let tmp = tempfile::tempdir().unwrap();
        let state = tmp.path().join("state");
        let cli =
            crate::cli::Cli::try_parse_from(["netns", "--state-dir", state.to_str().unwrap()])
                .unwrap();
        let cfg = cli.global.net_config();
        // No state directory at all: nothing created.
        poststop(&cfg, "ghost").unwrap();
        assert!(!state.exists());
        // A state directory without that lease.
        Store::open(&state).unwrap();
        poststop(&cfg, "ghost").unwrap();
    }
}
