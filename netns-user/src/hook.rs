//! The OCI hook: prestart sets a container's network up, poststop tears it down.
//!
//! Prestart runs its [`Step`]s in order while holding the state directory's lock; each
//! step that creates something per container records how to undo it, and any failure
//! undoes those in reverse (datapath endpoint, port link, veth, lease). The bridge and
//! ip_forward are shared by all containers and never undone.
//!
//! Poststop works only from the persisted lease keyed by container id (the pid and its
//! namespace are usually gone by then). Both phases are idempotent.
//!
//! Testing aid: `NETNS_FAIL_AT=<step>` (see [`Step::name`]) makes prestart fail right
//! after that step has done its work and registered its undo, so tests can prove that
//! rollback leaves nothing behind. `NETNS_KILL_AT=<step>` instead makes the hook
//! SIGKILL itself right after that step, so no rollback runs: what it leaves is what a
//! crash leaves, for reconcile ([`crate::reconcile`]) to clean. An unknown step name is
//! an error, so a typo cannot make such a test pass vacuously.
//!
//! Every prestart first reconciles leases whose container pid is dead (cheap /proc
//! checks), so leaks heal without anyone running `netns gc`.

use std::fmt;
use std::fs::File;
use std::net::Ipv4Addr;

use netns_common::Endpoint;

use crate::cli::GlobalArgs;
use crate::datapath::{Datapath, DatapathConfig, DatapathError};
use crate::ipam::{self, IpamError, Lease, LeaseRequest};
use crate::network::{self, Netlink, NetworkError, Uplink, bridge, sysctl, veth};
use crate::oci::{OciError, Phase, State};
use crate::portmap::{self, Mapping};
use crate::reconcile;
use crate::store::{Locked, Store, StoreError};

/// Environment variable naming the prestart step to fail (testing aid).
pub const FAIL_AT_ENV: &str = "NETNS_FAIL_AT";

/// Environment variable naming the prestart step after which the hook SIGKILLs itself
/// (testing aid: a crash, no rollback).
pub const KILL_AT_ENV: &str = "NETNS_KILL_AT";

/// Prestart steps, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Create/configure the bridge (shared, never undone).
    Bridge,
    /// Enable IPv4 forwarding in the hook's namespace (shared, never undone).
    IpForward,
    /// Allocate (or find) the container's lease. Undo: release it.
    Ipam,
    /// Create the veth pair and enslave the host end. Undo: delete the veth.
    Veth,
    /// lo/eth0 up, address and default route inside the container.
    ContainerNet,
    /// Load the datapath or open its pins (shared, never undone).
    DatapathLoad,
    /// Attach the port program to the host veth. Undo: detach.
    AttachPort,
    /// Register the container in the endpoint map. Undo: remove it.
    AddEndpoint,
    /// Port forwards declared in the `netns.ports` annotation. Undo: remove them.
    PortMap,
    /// Mark the lease complete with ifindex and MAC.
    Persist,
}

impl Step {
    pub const ALL: [Step; 10] = [
        Step::Bridge,
        Step::IpForward,
        Step::Ipam,
        Step::Veth,
        Step::ContainerNet,
        Step::DatapathLoad,
        Step::AttachPort,
        Step::AddEndpoint,
        Step::PortMap,
        Step::Persist,
    ];

    /// The name `NETNS_FAIL_AT` takes.
    pub fn name(self) -> &'static str {
        match self {
            Step::Bridge => "bridge",
            Step::IpForward => "ip-forward",
            Step::Ipam => "ipam",
            Step::Veth => "veth",
            Step::ContainerNet => "container-net",
            Step::DatapathLoad => "datapath-load",
            Step::AttachPort => "attach-port",
            Step::AddEndpoint => "add-endpoint",
            Step::PortMap => "port-map",
            Step::Persist => "persist",
        }
    }

    pub fn from_name(s: &str) -> Option<Step> {
        Step::ALL.into_iter().find(|st| st.name() == s)
    }
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Why a step failed.
#[derive(Debug, thiserror::Error)]
pub enum StepError {
    #[error(transparent)]
    Network(#[from] NetworkError),
    #[error(transparent)]
    Netlink(#[from] network::NetlinkError),
    #[error(transparent)]
    Sysctl(#[from] sysctl::SysctlError),
    #[error(transparent)]
    Ipam(#[from] IpamError),
    #[error(transparent)]
    Datapath(#[from] DatapathError),
    #[error(transparent)]
    PortMap(#[from] portmap::PortMapError),
    #[error("annotation netns.ports: {0}")]
    Annotation(#[from] portmap::SpecError),
    #[error(transparent)]
    Cgroup(#[from] crate::cgroup::CgroupError),
    #[error(transparent)]
    Reserve(#[from] crate::reserve::ReserveError),
    #[error("failure injected by {FAIL_AT_ENV}={0}")]
    Injected(Step),
}

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
    #[error("container {id}: prestart failed at step {step}{}", rollback_note(*.rollback_failures))]
    Prestart {
        id: String,
        step: Step,
        rollback_failures: usize,
        #[source]
        source: StepError,
    },
    #[error(
        "container {id}: poststop left {failures} item(s) behind; the lease is kept so a retry can finish"
    )]
    Poststop { id: String, failures: usize },
}

fn rollback_note(n: usize) -> String {
    if n == 0 {
        " (rolled back)".to_owned()
    } else {
        format!(" (rollback left {n} item(s) behind; see the log above)")
    }
}

fn step_names() -> String {
    Step::ALL.map(Step::name).join(", ")
}

/// Runs the hook for a parsed state.
pub fn run(g: &GlobalArgs, st: &State) -> Result<(), HookError> {
    match st.phase()? {
        Phase::Prestart => prestart(g, st),
        Phase::Poststop => poststop(g, &st.id),
    }
}

fn step_from_env(var: &'static str) -> Result<Option<Step>, HookError> {
    match std::env::var(var) {
        Ok(s) if s.is_empty() => Ok(None),
        Ok(value) => Step::from_name(&value)
            .map(Some)
            .ok_or(HookError::UnknownStep { var, value }),
        Err(_) => Ok(None),
    }
}

/// Something prestart made for this container, undone in reverse on failure.
#[derive(Debug)]
enum Undo {
    Lease,
    Veth(u32),
    Port(u32),
    Endpoint(Ipv4Addr),
    PortMaps(Vec<Mapping>),
}

struct Prestart<'a> {
    g: &'a GlobalArgs,
    id: &'a str,
    /// The `netns.ports` annotation, parsed and checked before anything is made.
    ports: Option<Vec<portmap::PortSpec>>,
    pid: u32,
    lock: &'a Locked<'a>,
    nl: Netlink,
    fail_at: Option<Step>,
    kill_at: Option<Step>,
    /// Start time and network-namespace inode of `pid`, recorded in the lease.
    pid_start: Option<u64>,
    netns_ino: Option<u64>,
    undo: Vec<Undo>,
    dp: Option<Datapath>,
}

pub fn prestart(g: &GlobalArgs, st: &State) -> Result<(), HookError> {
    let fail_at = step_from_env(FAIL_AT_ENV)?;
    let kill_at = step_from_env(KILL_AT_ENV)?;
    let id = st.id.as_str();
    let pid = st.live_pid()?;
    let setup = |source: StepError| HookError::Setup {
        id: id.to_owned(),
        source,
    };
    let ns = network::open_container_netns(pid).map_err(|e| setup(e.into()))?;
    // What identifies this container for reconcile: the pid's start time (pid reuse)
    // and its namespace, read after opening the namespace so both are the same process's.
    let netns_ino = ns
        .metadata()
        .ok()
        .map(|m| std::os::unix::fs::MetadataExt::ino(&m));
    let pid_start = reconcile::pid_start_time_in(std::path::Path::new("/proc"), pid);
    let store = Store::open(&g.state_dir)?;
    let lock = store.lock()?;
    let rt = network::runtime().map_err(|e| setup(e.into()))?;
    rt.block_on(async {
        let nl = Netlink::current().map_err(|e| setup(e.into()))?;
        let mut p = Prestart {
            g,
            id,
            ports: None,
            pid,
            lock: &lock,
            nl,
            fail_at,
            kill_at,
            pid_start,
            netns_ino,
            undo: Vec::new(),
            dp: None,
        };
        // Heal what dead containers left (a lost poststop, a killed hook) before
        // allocating: cheap unless something is actually dead.
        match reconcile::run(
            g,
            &lock,
            &p.nl,
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
        if p.already_done().await.map_err(setup)? {
            log::debug!("container {id}: already set up, nothing to do");
            return Ok(());
        }
        // Bad or colliding port forwards fail here, before anything is made. The port-map
        // step validates again (the host's sockets may change in between).
        if let Some(spec) = st.annotations.get(portmap::ANNOTATION) {
            let specs = portmap::parse_list(spec).map_err(|e| setup(e.into()))?;
            let new = portmap::expand(id, Ipv4Addr::UNSPECIFIED, &specs);
            portmap::load_table(&lock)
                .and_then(|t| portmap::validate(&t, &new, true))
                .map_err(|e| setup(e.into()))?;
            p.ports = Some(specs);
        }
        let ns_nl = Netlink::in_netns(&ns).map_err(|e| setup(e.into()))?;
        network::check_fresh_netns(&ns_nl, pid, &[])
            .await
            .map_err(|e| setup(e.into()))?;
        // Uplink first: its MTU is the default, and the datapath needs it.
        let uplink = network::uplink(&p.nl, g.uplink.as_deref())
            .await
            .map_err(|e| setup(e.into()))?;
        match p.steps(&ns, &uplink).await {
            Ok(()) => {
                // The collector is best effort: a container without it still works,
                // only its idle flows wait for LRU eviction instead of expiring.
                if let Err(e) = crate::commands::gc::spawn_collector(g) {
                    log::warn!("could not start the conntrack collector: {e}");
                }
                Ok(())
            }
            Err((step, source)) => {
                log::debug!(
                    "container {id}: step {step} failed, rolling back {:?}",
                    p.undo
                );
                let rollback_failures = p.rollback().await;
                Err(HookError::Prestart {
                    id: id.to_owned(),
                    step,
                    rollback_failures,
                    source,
                })
            }
        }
    })
}

impl Prestart<'_> {
    fn check(&self, step: Step) -> Result<(), (Step, StepError)> {
        if self.fail_at == Some(step) {
            return Err((step, StepError::Injected(step)));
        }
        if self.kill_at == Some(step) {
            log::warn!(
                "container {}: {KILL_AT_ENV}={step}: killing myself",
                self.id
            );
            let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL);
        }
        log::debug!("container {}: step {step} done", self.id);
        Ok(())
    }

    /// True if a complete setup for this container (same pid, veth present) exists.
    /// A partial or stale one (an earlier prestart that died, or a reused id whose
    /// poststop never ran) is torn down here, keeping its lease so the address stays.
    async fn already_done(&self) -> Result<bool, StepError> {
        let Some(lease) = ipam::get(self.lock, self.id)? else {
            return Ok(false);
        };
        let veth = self.nl.link_by_name(&lease.host_veth).await?;
        if lease.complete
            && lease.pid == self.pid
            && (lease.pid_start.is_none() || lease.pid_start == self.pid_start)
            && veth.as_ref().is_some_and(|l| l.index == lease.host_ifindex)
        {
            return Ok(true);
        }
        log::warn!(
            "container {}: found an incomplete or stale setup (pid {}, veth {}); redoing it",
            self.id,
            lease.pid,
            lease.host_veth
        );
        let failures = teardown(self.g, self.lock, self.id, &lease, &self.nl).await;
        if failures > 0 {
            log::warn!(
                "container {}: {failures} leftover(s) could not be removed",
                self.id
            );
        }
        Ok(false)
    }

    async fn steps(&mut self, ns: &File, uplink: &Uplink) -> Result<(), (Step, StepError)> {
        let g = self.g;
        let gw = g.ip;
        let mtu = g.mtu.or(uplink.mtu).unwrap_or(network::DEFAULT_MTU);
        log::debug!(
            "uplink {} (ifindex {}, {:?}), mtu {mtu}",
            uplink.name,
            uplink.index,
            uplink.addr
        );

        let step = Step::Bridge;
        let br = bridge::ensure(&self.nl, &g.bridge, gw, mtu)
            .await
            .map_err(|e| (step, e.into()))?;
        self.check(step)?;

        let step = Step::IpForward;
        if sysctl::enable_ip_forward().map_err(|e| (step, e.into()))? {
            log::info!("enabled IPv4 forwarding");
        }
        self.check(step)?;

        let step = Step::Ipam;
        let host_veth = veth::host_veth_name(self.pid);
        let req = LeaseRequest {
            pid: self.pid,
            pid_start: self.pid_start,
            netns_ino: self.netns_ino,
            host_veth: host_veth.clone(),
            bridge: g.bridge.clone(),
        };
        let (mut lease, _) =
            ipam::allocate(self.lock, gw, self.id, req).map_err(|e| (step, e.into()))?;
        self.undo.push(Undo::Lease);
        if lease.pid != self.pid
            || lease.host_veth != host_veth
            || lease.pid_start != self.pid_start
            || lease.netns_ino != self.netns_ino
        {
            lease.pid = self.pid;
            lease.pid_start = self.pid_start;
            lease.netns_ino = self.netns_ino;
            lease.host_veth.clone_from(&host_veth);
            lease.host_ifindex = 0;
            lease.created_unix = ipam::now_unix();
            lease.complete = false;
            ipam::update(self.lock, self.id, &lease).map_err(|e| (step, e.into()))?;
        }
        log::debug!(
            "container {}: address {}/{}",
            self.id,
            lease.ip,
            lease.prefix_len
        );
        self.check(step)?;

        let step = Step::Veth;
        let err = |e: NetworkError| (step, StepError::from(e));
        if let Some(old) = self
            .nl
            .link_by_name(&host_veth)
            .await
            .map_err(|e| err(e.into()))?
        {
            // The pid is this container's now, so a veth named after it is a leftover.
            log::warn!(
                "deleting leftover interface {host_veth} (ifindex {})",
                old.index
            );
            self.nl
                .del_link(old.index)
                .await
                .map_err(|e| err(e.into()))?;
        }
        let host_index = veth::create(&self.nl, &host_veth, ns, mtu)
            .await
            .map_err(err)?;
        self.undo.push(Undo::Veth(host_index));
        veth::attach_host_end(&self.nl, host_index, br.index)
            .await
            .map_err(err)?;
        self.check(step)?;

        let step = Step::ContainerNet;
        let ns_nl = Netlink::in_netns(ns).map_err(|e| (step, e.into()))?;
        let mac = veth::configure_container(&ns_nl, lease.ip, lease.prefix_len, lease.gateway)
            .await
            .map_err(|e| (step, e.into()))?;
        self.check(step)?;

        let step = Step::DatapathLoad;
        let cfg = DatapathConfig {
            bpffs_dir: g.bpffs_dir.clone(),
            uplink_ifindex: uplink.index,
            uplink_addr: uplink.addr,
            bridge_ifindex: br.index,
            gateway: gw.addr,
            prefix_len: gw.prefix_len,
            nat_ports: (g.nat_ports.min, g.nat_ports.max),
            ct_max: g.ct_max,
            allow_inbound: g.inbound_cidrs(),
        };
        let dp = Datapath::ensure_loaded(&cfg).map_err(|e| (step, e.into()))?;
        dp.set_gc_interval(g.gc_interval)
            .map_err(|e| (step, e.into()))?;
        if let Some(cg) = crate::cgroup::resolve(&g.cgroup).map_err(|e| (step, e.into()))? {
            dp.attach_cgroup(&cg).map_err(|e| (step, e.into()))?;
        }
        // Host sockets must never pick a masquerade port as their ephemeral port.
        crate::reserve::nat_range(Some(self.lock), g.nat_ports.min, g.nat_ports.max)
            .map_err(|e| (step, e.into()))?;
        self.dp = Some(dp);
        self.check(step)?;

        let step = Step::AttachPort;
        let dp = self.dp.as_mut().expect("loaded above");
        dp.attach_port(host_index).map_err(|e| (step, e.into()))?;
        self.undo.push(Undo::Port(host_index));
        self.check(step)?;

        let step = Step::AddEndpoint;
        let dp = self.dp.as_mut().expect("loaded above");
        let ep = Endpoint {
            ifindex: host_index,
            mac,
            _pad: [0; 2],
        };
        dp.add_endpoint(lease.ip, ep)
            .map_err(|e| (step, e.into()))?;
        self.undo.push(Undo::Endpoint(lease.ip));
        self.check(step)?;

        let step = Step::PortMap;
        if let Some(specs) = &self.ports {
            let dp = self.dp.as_ref().expect("loaded above");
            let added = portmap::add(self.lock, dp, self.id, lease.ip, specs)
                .map_err(|e| (step, e.into()))?;
            log::debug!("container {}: {} port forward(s)", self.id, added.len());
            self.undo.push(Undo::PortMaps(added));
        }
        self.check(step)?;

        let step = Step::Persist;
        lease.host_ifindex = host_index;
        lease.mac = Some(network::format_mac(mac));
        lease.complete = true;
        ipam::update(self.lock, self.id, &lease).map_err(|e| (step, e.into()))?;
        self.check(step)?;
        Ok(())
    }

    /// Undoes in reverse; returns how many undo actions failed (each is logged).
    async fn rollback(&mut self) -> usize {
        let mut failures = 0;
        while let Some(u) = self.undo.pop() {
            let r: Result<(), StepError> = match &u {
                Undo::PortMaps(ms) => {
                    portmap::remove(self.lock, self.dp.as_ref(), ms).map_err(Into::into)
                }
                Undo::Endpoint(ip) => match self.dp.as_mut() {
                    Some(dp) => dp.remove_endpoint(*ip).map_err(Into::into),
                    None => Ok(()),
                },
                Undo::Port(idx) => match self.dp.as_mut() {
                    Some(dp) => dp.detach_port(*idx).map_err(Into::into),
                    None => Ok(()),
                },
                Undo::Veth(idx) => self.nl.del_link(*idx).await.map(drop).map_err(Into::into),
                Undo::Lease => ipam::release(self.lock, self.id)
                    .map(drop)
                    .map_err(Into::into),
            };
            match r {
                Ok(()) => log::debug!("container {}: rolled back {u:?}", self.id),
                Err(e) => {
                    failures += 1;
                    log::error!(
                        "container {}: rolling back {u:?} failed: {}",
                        self.id,
                        crate::error_chain(&e)
                    );
                }
            }
        }
        failures
    }
}

/// Removes the datapath entries and the veth of a lease (not the lease itself);
/// returns how many parts failed (each is logged). Missing parts are not failures.
pub(crate) async fn teardown(
    g: &GlobalArgs,
    lock: &Locked<'_>,
    id: &str,
    lease: &Lease,
    nl: &Netlink,
) -> usize {
    let mut failures = 0;
    let mut fail = |what: &str, e: &dyn std::error::Error| {
        failures += 1;
        log::error!("container {id}: {what}: {}", crate::error_chain(e));
    };
    let link = match nl.link_by_name(&lease.host_veth).await {
        Ok(l) => l,
        Err(e) => {
            fail("looking up the host veth", &e);
            None
        }
    };
    // An interface with that name but another ifindex belongs to someone else now.
    let ours = link.filter(|l| lease.host_ifindex == 0 || l.index == lease.host_ifindex);
    let port = match (&ours, lease.host_ifindex) {
        (Some(l), _) => Some(l.index),
        (None, 0) => None,
        (None, i) => Some(i),
    };
    // Never detach a port another live lease now uses (ifindex reuse).
    let port = port.filter(|p| {
        ipam::list(lock).is_ok_and(|all| {
            !all.iter()
                .any(|(other, l)| other != id && l.host_ifindex == *p)
        })
    });

    match Datapath::open(&g.bpffs_dir) {
        Ok(Some(mut dp)) => {
            // Port forwards first, so nothing is forwarded to a vanishing address.
            if let Err(e) = portmap::remove_container(lock, Some(&dp), id) {
                fail("removing port forwards", &e);
            }
            // An endpoint never added (prestart died before) is not a failure;
            // remove_endpoint itself reports a missing key as one.
            match reconcile::endpoint_ips(&dp) {
                Ok(ips) if !ips.contains(&lease.ip) => {}
                _ => {
                    if let Err(e) = dp.remove_endpoint(lease.ip) {
                        fail("removing the datapath endpoint", &e);
                    }
                }
            }
            if let Some(p) = port
                && let Err(e) = dp.detach_port(p)
            {
                fail("detaching the port program", &e);
            }
        }
        Ok(None) => log::debug!("no datapath pinned under {}", g.bpffs_dir.display()),
        Err(e) => fail("opening the datapath", &e),
    }
    if let Some(l) = ours {
        match nl.del_link(l.index).await {
            Ok(_) => log::debug!("container {id}: deleted {}", lease.host_veth),
            Err(e) => fail("deleting the host veth", &e),
        }
    }
    failures
}

/// Tears down what prestart made for `id`; an unknown id is not an error.
pub fn poststop(g: &GlobalArgs, id: &str) -> Result<(), HookError> {
    let Some(store) = Store::open_existing(&g.state_dir)? else {
        log::debug!(
            "container {id}: no state directory {}: nothing to tear down",
            g.state_dir.display()
        );
        return Ok(());
    };
    let lock = store.lock()?;
    let Some(lease) = ipam::get(&lock, id)? else {
        log::debug!("container {id}: no lease: nothing to tear down");
        return Ok(());
    };
    let setup = |source: StepError| HookError::Setup {
        id: id.to_owned(),
        source,
    };
    let rt = network::runtime().map_err(|e| setup(e.into()))?;
    let failures = rt.block_on(async {
        let nl = Netlink::current().map_err(|e| setup(e.into()))?;
        Ok::<_, HookError>(teardown(g, &lock, id, &lease, &nl).await)
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
    fn step_names_roundtrip() {
        for s in Step::ALL {
            assert_eq!(Step::from_name(s.name()), Some(s));
        }
        assert_eq!(Step::from_name("nope"), None);
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
        // No state directory at all: nothing created.
        poststop(&cli.global, "ghost").unwrap();
        assert!(!state.exists());
        // A state directory without that lease.
        Store::open(&state).unwrap();
        poststop(&cli.global, "ghost").unwrap();
    }
}
