//! DEL: idempotent. Works with the namespace already gone (the veth went with it; the
//! lease says what else to remove) and when nothing was ever added. The flows through
//! the attachment's host ports are flushed, so a replaced container never inherits
//! stale UDP flows (what the CNI portmap plugin leaks).

use super::conf::NetConf;
use super::error::{CniError, code, from_error};
use super::{Env, ipam_plugin, require_caps, runtime};
use crate::config::NetConfig;
use crate::container;
use crate::datapath::Datapath;
use crate::ipam;
use crate::network::Netlink;
use crate::portmap;
use crate::store::{Locked, Store};

pub fn run(env: &Env, c: &NetConf, stdin: &[u8]) -> Result<(), CniError> {
    let key = env.key()?;
    let cfg = c.net_config()?;
    let ipam_type = c.ipam_type()?;
    require_caps("CNI DEL")?;
    let store = Store::open_existing(&cfg.state_dir)
        .map_err(|e| from_error(code::IO, "opening the state directory", &e))?;
    if let Some(store) = store {
        let lock = store
            .lock()
            .map_err(|e| from_error(code::IO, "locking the state directory", &e))?;
        remove(&cfg, &lock, &key)?;
    }
    if let Some(t) = &ipam_type {
        ipam_plugin::exec(t, "DEL", &env.path, stdin)?;
    }
    Ok(())
}

/// Tears down and releases the attachment `key` (nothing if it has no lease).
pub(super) fn remove(cfg: &NetConfig, lock: &Locked<'_>, key: &str) -> Result<(), CniError> {
    let io = |e: &dyn std::error::Error| from_error(code::IO, "reading the state directory", e);
    let Some(lease) = ipam::get(lock, key).map_err(|e| io(&e))? else {
        log::debug!("{key}: no lease: nothing to delete");
        return Ok(());
    };
    let mappings: Vec<_> = portmap::load_table(lock)
        .map_err(|e| io(&e))?
        .into_iter()
        .filter(|m| m.container_id == key)
        .collect();
    let failures = runtime()?.block_on(async {
        let nl = Netlink::current().map_err(|e| from_error(code::SETUP, "netlink", &e))?;
        Ok::<_, CniError>(container::teardown(cfg, lock, key, &lease, &nl).await)
    })?;
    if failures > 0 {
        return Err(CniError::new(
            code::SETUP,
            format!(
                "DEL {key} left {failures} item(s) behind (logged on stderr); the lease is kept so a retry can finish"
            ),
        ));
    }
    if !mappings.is_empty()
        && let Ok(Some(dp)) = Datapath::open(&cfg.bpffs_dir)
        && let Err(e) = portmap::flush_conntrack(&dp, &mappings)
    {
        log::warn!(
            "{key}: flushing the flows of its host ports: {}",
            crate::error_chain(&e)
        );
    }
    ipam::release(lock, key).map_err(|e| io(&e))?;
    log::debug!("{key}: released {}", lease.ip);
    Ok(())
}
