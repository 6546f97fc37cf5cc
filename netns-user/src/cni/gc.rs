//! GC: every attachment of this network that `cni.dev/valid-attachments` does not list
//! is torn down and released (lease, veth, endpoint, port forwards); then the IPAM
//! plugin gets its own GC. Leases of hook containers and of other networks sharing the
//! state directory are not judged here.

use super::conf::{NetConf, ValidAttachment};
use super::error::{CniError, code, from_error};
use super::{Env, del, ipam_plugin, require_caps};
use crate::ipam;
use crate::store::Store;

pub fn run(env: &Env, c: &NetConf, stdin: &[u8]) -> Result<(), CniError> {
    let Some(valid) = &c.valid_attachments else {
        return Err(CniError::new(
            code::INVALID_CONFIG,
            "GC needs \"cni.dev/valid-attachments\" (the attachments to keep)",
        ));
    };
    let cfg = c.net_config()?;
    let ipam_type = c.ipam_type()?;
    require_caps("CNI GC")?;
    let mut failed = Vec::new();
    if let Some(store) = Store::open_existing(&cfg.state_dir)
        .map_err(|e| from_error(code::IO, "opening the state directory", &e))?
    {
        let lock = store
            .lock()
            .map_err(|e| from_error(code::IO, "locking the state directory", &e))?;
        let leases =
            ipam::list(&lock).map_err(|e| from_error(code::IO, "reading the leases", &e))?;
        for (key, lease) in leases {
            let Some(a) = &lease.cni else { continue };
            let listed = ValidAttachment {
                container_id: a.container_id.clone(),
                ifname: a.ifname.clone(),
            };
            if a.network != c.name || valid.contains(&listed) {
                continue;
            }
            log::info!(
                "GC: {key} ({}) is not a valid attachment: removing it",
                lease.ip
            );
            if let Err(e) = del::remove(&cfg, &lock, &key) {
                failed.push(format!("{key}: {e}"));
            }
        }
    }
    if let Some(t) = &ipam_type
        && let Err(e) = ipam_plugin::exec(t, "GC", &env.path, stdin)
    {
        // Older IPAM plugins (before spec 1.1) know no GC; ours is done regardless.
        log::warn!("IPAM plugin GC: {e}");
    }
    if failed.is_empty() {
        Ok(())
    } else {
        Err(CniError::new(
            code::SETUP,
            format!("GC could not remove {} attachment(s)", failed.len()),
        )
        .with_details(failed.join("; ")))
    }
}
