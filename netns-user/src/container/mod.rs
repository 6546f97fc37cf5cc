//! One container's network, from a typed [`NetConfig`]: [`setup`] runs the [`Step`]s in
//! order under the state lock and records an [`Undo`] for everything it makes for this
//! container; a failure undoes those in reverse (port forwards, datapath endpoint, port
//! link, veth, lease). [`teardown`] removes a container's network from its persisted
//! lease through the same undo path, collecting failures the way netavark does: every
//! part is tried, each failure is logged and counted. Undo goes through [`UndoOps`], so
//! the rollback logic is unit-tested without root.

mod step;
mod undo;

use std::fs::File;
use std::net::Ipv4Addr;

use netns_common::Endpoint;

pub use step::{Faults, SetupError, Step, StepError};
pub use undo::{RealOps, Undo, UndoOps, rollback, teardown, teardown_plan};

use crate::config::NetConfig;
use crate::datapath::Datapath;
use crate::host;
use crate::ipam::{self, CniAttachment, Lease, LeaseRequest};
use crate::network::{self, Netlink, NetworkError, Uplink, veth};
use crate::portmap::{self, PortSpec};
use crate::store::Locked;

/// What identifies the container being set up.
pub struct Request<'a> {
    pub id: &'a str,
    pub pid: u32,
    /// Start time and network-namespace inode of `pid`, recorded in the lease so
    /// reconcile can tell a dead container from a reused pid.
    pub pid_start: Option<u64>,
    pub netns_ino: Option<u64>,
    /// The container's network namespace.
    pub ns: &'a File,
    /// Port forwards to set up (already parsed and validated).
    pub ports: Option<Vec<PortSpec>>,
    /// The interface name inside the container.
    pub ifname: &'a str,
    /// The address, when a delegated IPAM plugin chose it.
    pub fixed_ip: Option<Ipv4Addr>,
    /// Set for a CNI attachment (pid is 0 then).
    pub cni: Option<CniAttachment>,
}

impl<'a> Request<'a> {
    /// A hook container: `pid`'s namespace gets `eth0`.
    pub fn hook(id: &'a str, pid: u32, ns: &'a File) -> Request<'a> {
        Request {
            id,
            pid,
            pid_start: None,
            netns_ino: None,
            ns,
            ports: None,
            ifname: veth::CONTAINER_IFNAME,
            fixed_ip: None,
            cni: None,
        }
    }
}

/// Sets up the network of `req`'s container; a failure rolls back what this call made.
/// Returns false if a complete setup already existed (nothing to do).
pub async fn setup(
    cfg: &NetConfig,
    lock: &Locked<'_>,
    nl: &Netlink,
    uplink: &Uplink,
    req: Request<'_>,
    faults: Faults,
) -> Result<bool, SetupError> {
    let mut s = Setup {
        cfg,
        lock,
        nl,
        req,
        faults,
        undo: Vec::new(),
        dp: None,
    };
    match s.steps(uplink).await {
        Ok(()) => Ok(true),
        Err((step, source)) => {
            log::debug!(
                "container {}: step {step} failed, rolling back {:?}",
                s.req.id,
                s.undo
            );
            let mut ops = RealOps {
                lock,
                id: s.req.id,
                nl,
                dp: s.dp.as_mut(),
            };
            let rollback_failures = rollback(s.req.id, &mut s.undo, &mut ops).await;
            Err(SetupError {
                step,
                rollback_failures,
                source,
            })
        }
    }
}

/// True if a complete setup for this container (same pid, veth present) exists. A
/// partial or stale one (an earlier prestart that died, or a reused id whose poststop
/// never ran) is torn down here, keeping its lease so the address stays.
pub async fn already_done(
    cfg: &NetConfig,
    lock: &Locked<'_>,
    nl: &Netlink,
    req: &Request<'_>,
) -> Result<bool, StepError> {
    let Some(lease) = ipam::get(lock, req.id)? else {
        return Ok(false);
    };
    let veth = nl.link_by_name(&lease.host_veth).await?;
    if lease.complete
        && lease.pid == req.pid
        && (lease.pid_start.is_none() || lease.pid_start == req.pid_start)
        && (lease.netns_ino.is_none() || lease.netns_ino == req.netns_ino)
        && veth.as_ref().is_some_and(|l| l.index == lease.host_ifindex)
    {
        return Ok(true);
    }
    log::warn!(
        "container {}: found an incomplete or stale setup (pid {}, veth {}); redoing it",
        req.id,
        lease.pid,
        lease.host_veth
    );
    let failures = teardown(cfg, lock, req.id, &lease, nl).await;
    if failures > 0 {
        log::warn!(
            "container {}: {failures} leftover(s) could not be removed",
            req.id
        );
    }
    Ok(false)
}

struct Setup<'a> {
    cfg: &'a NetConfig,
    lock: &'a Locked<'a>,
    nl: &'a Netlink,
    req: Request<'a>,
    faults: Faults,
    undo: Vec<Undo>,
    dp: Option<Datapath>,
}

impl Setup<'_> {
    fn check(&self, step: Step) -> Result<(), (Step, StepError)> {
        if self.faults.fail_at == Some(step) {
            return Err((step, StepError::Injected(step)));
        }
        if self.faults.kill_at == Some(step) {
            log::warn!(
                "container {}: killing myself after step {step}",
                self.req.id
            );
            let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL);
        }
        log::debug!("container {}: step {step} done", self.req.id);
        Ok(())
    }

    async fn steps(&mut self, uplink: &Uplink) -> Result<(), (Step, StepError)> {
        let (cfg, id, pid) = (self.cfg, self.req.id, self.req.pid);
        let mtu = host::mtu(cfg, uplink);
        log::debug!(
            "uplink {} (ifindex {}, {:?}), mtu {mtu}",
            uplink.name,
            uplink.index,
            uplink.addr
        );

        let step = Step::Bridge;
        let br = host::bridge(cfg, self.nl, mtu)
            .await
            .map_err(|e| (step, e.into()))?;
        self.check(step)?;

        let step = Step::IpForward;
        host::enable_forwarding(cfg, uplink).map_err(|e| (step, e.into()))?;
        self.check(step)?;

        let step = Step::Ipam;
        let host_veth = self.host_veth_name().await.map_err(|e| (step, e))?;
        let mut lease = self.lease(host_veth).map_err(|e| (step, e))?;
        self.check(step)?;

        let step = Step::Veth;
        let err = |e: NetworkError| (step, StepError::from(e));
        if let Some(old) = self
            .nl
            .link_by_name(&lease.host_veth)
            .await
            .map_err(|e| err(e.into()))?
        {
            // The pid is this container's now, so a veth named after it is a leftover.
            log::warn!(
                "deleting leftover interface {} (ifindex {})",
                lease.host_veth,
                old.index
            );
            self.nl
                .del_link(old.index)
                .await
                .map_err(|e| err(e.into()))?;
        }
        let host_index = veth::create(self.nl, &lease.host_veth, self.req.ifname, self.req.ns, mtu)
            .await
            .map_err(err)?;
        self.undo.push(Undo::Veth(host_index));
        veth::attach_host_end(self.nl, host_index, br.index)
            .await
            .map_err(err)?;
        self.check(step)?;

        let step = Step::ContainerNet;
        let ns_nl = Netlink::in_netns(self.req.ns).map_err(|e| (step, e.into()))?;
        let mac = veth::configure_container(
            &ns_nl,
            self.req.ifname,
            lease.ip,
            lease.prefix_len,
            lease.gateway,
            lease.addr6(),
        )
        .await
        .map_err(|e| (step, e.into()))?;
        self.check(step)?;

        let step = Step::DatapathLoad;
        let dp =
            host::load_datapath(cfg, uplink, &br, Some(self.lock)).map_err(|e| (step, e.into()))?;
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
            generation: netns_common::endpoint_generation(self.req.id),
        };
        dp.add_endpoint(lease.ip, lease.ip6, ep)
            .map_err(|e| (step, e.into()))?;
        self.undo.push(Undo::Endpoint(lease.ip));
        self.check(step)?;

        let step = Step::PortMap;
        if let Some(specs) = &self.req.ports {
            let dp = self.dp.as_ref().expect("loaded above");
            let added = portmap::add(self.lock, dp, id, lease.ip, lease.ip6, specs)
                .map_err(|e| (step, e.into()))?;
            log::debug!("container {id}: {} port forward(s)", added.len());
            self.undo.push(Undo::PortMaps(added));
        }
        self.check(step)?;

        let step = Step::Persist;
        lease.host_ifindex = host_index;
        lease.mac = Some(network::format_mac(mac));
        lease.complete = true;
        ipam::update(self.lock, id, &lease).map_err(|e| (step, e.into()))?;
        log::debug!(
            "container {id} (pid {pid}): {}/{}",
            lease.ip,
            lease.prefix_len
        );
        self.check(step)?;
        Ok(())
    }

    /// The host end's name: `netnsv0-<pid>` for a hook container; for a CNI attachment
    /// the one its lease has, else the first hashed name that no interface and no other
    /// lease uses (the hash is short, so a collision must not cost another attachment
    /// its veth).
    async fn host_veth_name(&self) -> Result<String, StepError> {
        let Some(_) = &self.req.cni else {
            return Ok(veth::host_veth_name(self.req.pid));
        };
        let leases = ipam::list(self.lock)?;
        if let Some(l) = leases.get(self.req.id) {
            return Ok(l.host_veth.clone());
        }
        for attempt in 0..64 {
            let name = veth::cni_host_veth_name(self.req.id, attempt);
            if !leases.values().any(|l| l.host_veth == name)
                && self.nl.link_by_name(&name).await?.is_none()
            {
                return Ok(name);
            }
        }
        Err(NetworkError::NoFreeName(self.req.id.to_owned()).into())
    }

    /// Allocates (or finds) the lease and makes it this pid's, incomplete until Persist.
    fn lease(&mut self, host_veth: String) -> Result<Lease, StepError> {
        let r = &self.req;
        let want = LeaseRequest {
            pid: r.pid,
            pid_start: r.pid_start,
            netns_ino: r.netns_ino,
            host_veth: host_veth.clone(),
            bridge: self.cfg.bridge.clone(),
            fixed_ip: r.fixed_ip,
            ifname: (r.ifname != veth::CONTAINER_IFNAME).then(|| r.ifname.to_owned()),
            cni: r.cni.clone(),
        };
        let (mut lease, _) = ipam::allocate(self.lock, self.cfg.gateway, r.id, want)?;
        self.undo.push(Undo::Lease);
        // An existing lease follows `--ip6` as it is now (turned on, off or changed).
        let v6_changed = lease.set_ip6(self.cfg.gateway, self.cfg.gateway6);
        if lease.pid != r.pid
            || lease.host_veth != host_veth
            || lease.pid_start != r.pid_start
            || lease.netns_ino != r.netns_ino
        {
            lease.pid = r.pid;
            lease.pid_start = r.pid_start;
            lease.netns_ino = r.netns_ino;
            lease.host_veth = host_veth;
            lease.host_ifindex = 0;
            lease.created_unix = ipam::now_unix();
            lease.complete = false;
            ipam::update(self.lock, r.id, &lease)?;
        } else if v6_changed {
            ipam::update(self.lock, r.id, &lease)?;
        }
        Ok(lease)
    }
}
