//! The undo log: what setup made for a container, undone in reverse on failure, and
//! (rebuilt from the lease) by teardown. Undo goes through [`UndoOps`], so the rollback
//! logic is unit-tested without root.

use std::net::Ipv4Addr;

use super::StepError;
use crate::config::NetConfig;
use crate::datapath::Datapath;
use crate::ipam::{self, Lease};
use crate::network::Netlink;
use crate::portmap::{self, Mapping};
use crate::store::Locked;

/// Something setup made for this container, undone in reverse on failure (and, built
/// from the lease, by teardown).
#[derive(Debug, Clone)]
pub enum Undo {
    Lease,
    Veth(u32),
    Port(u32),
    Endpoint(Ipv4Addr),
    PortMaps(Vec<Mapping>),
}

/// The actions undo needs; [`RealOps`] does them, tests fake them.
#[expect(
    async_fn_in_trait,
    reason = "used with concrete types on one thread only; no Send bound is needed"
)]
pub trait UndoOps {
    async fn undo(&mut self, u: &Undo) -> Result<(), StepError>;
}

/// Undoes `undo` in reverse, every action even after a failure; returns how many failed
/// (each is logged).
pub async fn rollback(id: &str, undo: &mut Vec<Undo>, ops: &mut impl UndoOps) -> usize {
    let mut failures = 0;
    while let Some(u) = undo.pop() {
        match ops.undo(&u).await {
            Ok(()) => log::debug!("container {id}: undid {u:?}"),
            Err(e) => {
                failures += 1;
                log::error!(
                    "container {id}: undoing {u:?} failed: {}",
                    crate::error_chain(&e)
                );
            }
        }
    }
    failures
}

/// Undo on the real system. Missing parts are not failures: every action is idempotent.
pub struct RealOps<'a> {
    pub lock: &'a Locked<'a>,
    pub id: &'a str,
    pub nl: &'a Netlink,
    /// None: no datapath is loaded, there is nothing to remove from it.
    pub dp: Option<&'a mut Datapath>,
}

impl UndoOps for RealOps<'_> {
    async fn undo(&mut self, u: &Undo) -> Result<(), StepError> {
        match u {
            Undo::PortMaps(ms) => Ok(portmap::remove(self.lock, self.dp.as_deref(), ms)?),
            // No conntrack walk: the container's flows are stale once its endpoint is
            // gone (see `Datapath::retire_endpoint`).
            Undo::Endpoint(ip) => match self.dp.as_deref_mut() {
                Some(dp) => Ok(dp.retire_endpoint(*ip)?),
                None => Ok(()),
            },
            Undo::Port(idx) => match self.dp.as_deref_mut() {
                Some(dp) => Ok(dp.detach_port(*idx)?),
                None => Ok(()),
            },
            // del_link treats an interface that is already gone as done.
            Undo::Veth(idx) => Ok(self.nl.del_link(*idx).await.map(drop)?),
            Undo::Lease => Ok(ipam::release(self.lock, self.id).map(drop)?),
        }
    }
}

/// What to undo to remove a lease's network, in the order setup made it. An interface
/// with the lease's name but another ifindex belongs to someone else now, and a port
/// that another lease now uses (ifindex reuse) is never detached.
pub fn teardown_plan(
    id: &str,
    lease: &Lease,
    veth_ifindex: Option<u32>,
    all: &[(String, Lease)],
    mappings: Vec<Mapping>,
) -> Vec<Undo> {
    let ours = veth_ifindex.filter(|i| lease.host_ifindex == 0 || *i == lease.host_ifindex);
    let port = ours
        .or((lease.host_ifindex != 0).then_some(lease.host_ifindex))
        .filter(|p| !all.iter().any(|(o, l)| o != id && l.host_ifindex == *p));
    let mut plan = Vec::new();
    if let Some(i) = ours {
        plan.push(Undo::Veth(i));
    }
    if let Some(p) = port {
        plan.push(Undo::Port(p));
    }
    plan.push(Undo::Endpoint(lease.ip));
    if !mappings.is_empty() {
        plan.push(Undo::PortMaps(mappings));
    }
    plan
}

/// Removes the port forwards, datapath entries and veth of a lease (not the lease
/// itself); returns how many parts failed (each is logged). The conntrack tables are
/// not read: the container's flows are stale once its endpoint is gone, so a stop
/// costs the same whatever the tables hold.
pub async fn teardown(
    cfg: &NetConfig,
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
    let veth = match nl.link_by_name(&lease.host_veth).await {
        Ok(l) => l.map(|l| l.index),
        Err(e) => {
            fail("looking up the host veth", &e);
            None
        }
    };
    let all: Vec<(String, Lease)> = match ipam::list(lock) {
        Ok(m) => m.into_iter().collect(),
        Err(e) => {
            fail("reading the leases", &e);
            return failures;
        }
    };
    let mappings: Vec<Mapping> = match portmap::load_table(lock) {
        Ok(t) => t.into_iter().filter(|m| m.container_id == id).collect(),
        Err(e) => {
            fail("reading the port table", &e);
            Vec::new()
        }
    };
    let mut plan = teardown_plan(id, lease, veth, &all, mappings);
    let mut dp = match Datapath::open(&cfg.bpffs_dir) {
        Ok(dp) => dp,
        Err(e) => {
            fail("opening the datapath", &e);
            None
        }
    };
    if dp.is_none() {
        log::debug!("no datapath pinned under {}", cfg.bpffs_dir.display());
    }
    let mut ops = RealOps {
        lock,
        id,
        nl,
        dp: dp.as_mut(),
    };
    failures + rollback(id, &mut plan, &mut ops).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::container::Step;

    /// Records undo actions and fails the ones it is told to.
    #[derive(Default)]
    struct Fake {
        done: Vec<String>,
        fail: Vec<&'static str>,
    }

    fn kind(u: &Undo) -> &'static str {
        match u {
            Undo::Lease => "lease",
            Undo::Veth(_) => "veth",
            Undo::Port(_) => "port",
            Undo::Endpoint(_) => "endpoint",
            Undo::PortMaps(_) => "portmaps",
        }
    }

    impl UndoOps for Fake {
        async fn undo(&mut self, u: &Undo) -> Result<(), StepError> {
            self.done.push(kind(u).to_owned());
            if self.fail.contains(&kind(u)) {
                return Err(StepError::Injected(Step::Veth));
            }
            Ok(())
        }
    }

    fn block_on<F: std::future::Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(f)
    }

    fn lease(ip: [u8; 4], ifindex: u32) -> Lease {
        serde_json::from_value(serde_json::json!({
            "ip": Ipv4Addr::from(ip), "prefix_len": 16, "gateway": "172.19.0.1",
            "pid": 1, "host_veth": "netnsv0-1", "host_ifindex": ifindex,
            "bridge": "netns0", "created_unix": 0, "complete": true
        }))
        .unwrap()
    }

    #[test]
    fn rollback_undoes_in_reverse_and_keeps_going_after_a_failure() {
        let mut undo = vec![
            Undo::Lease,
            Undo::Veth(7),
            Undo::Port(7),
            Undo::Endpoint(Ipv4Addr::new(172, 19, 0, 2)),
            Undo::PortMaps(Vec::new()),
        ];
        let mut ops = Fake {
            fail: vec!["port", "endpoint"],
            ..Fake::default()
        };
        let failures = block_on(rollback("c", &mut undo, &mut ops));
        assert_eq!(failures, 2);
        assert!(undo.is_empty());
        assert_eq!(
            ops.done,
            ["portmaps", "endpoint", "port", "veth", "lease"].map(String::from)
        );
    }

    #[test]
    fn teardown_plan_spares_what_belongs_to_others() {
        let mine = lease([172, 19, 0, 2], 7);
        // Our veth: removed with its port; the lease itself is released by the caller.
        let plan = teardown_plan("c", &mine, Some(7), &[("c".into(), mine.clone())], vec![]);
        assert_eq!(
            plan.iter().map(kind).collect::<Vec<_>>(),
            ["veth", "port", "endpoint"]
        );
        // An interface of that name with another ifindex is someone else's; ifindex 7
        // now belongs to another lease: neither is touched.
        let other = lease([172, 19, 0, 3], 7);
        let all = [("c".into(), mine.clone()), ("d".into(), other)];
        let plan = teardown_plan("c", &mine, Some(9), &all, vec![]);
        assert_eq!(plan.iter().map(kind).collect::<Vec<_>>(), ["endpoint"]);
        // A prestart that died before Persist: no ifindex, the veth is gone too.
        let plan = teardown_plan("c", &lease([172, 19, 0, 2], 0), None, &[], vec![]);
        assert_eq!(plan.iter().map(kind).collect::<Vec<_>>(), ["endpoint"]);
    }
}
