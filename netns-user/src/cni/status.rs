//! STATUS: ready when the state directory is writable and the datapath is loaded or can
//! be (privileges, and a bpffs under `bpffsDir`).

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt as _;
use std::path::Path;

use super::conf::NetConf;
use super::error::{CniError, code, from_error};
use crate::datapath::Datapath;
use crate::store::Store;

/// statfs(2) f_type of a bpffs.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

pub fn run(c: &NetConf) -> Result<(), CniError> {
    let cfg = c.net_config()?;
    let unavailable =
        |msg: &str, e: &dyn std::error::Error| from_error(code::NOT_AVAILABLE, msg, e);
    let store = Store::open(&cfg.state_dir)
        .map_err(|e| unavailable("the state directory is not usable", &e))?;
    store
        .lock()
        .map_err(|e| unavailable("the state directory is not writable", &e))?;
    crate::caps::require("CNI ADD", crate::caps::Need::DATAPATH)
        .map_err(|e| unavailable("the datapath cannot be loaded", &e))?;
    match Datapath::open(&cfg.bpffs_dir) {
        Ok(Some(_)) => Ok(()),
        Ok(None) if on_bpffs(&cfg.bpffs_dir) => Ok(()),
        Ok(None) => Err(CniError::new(
            code::NOT_AVAILABLE,
            format!(
                "{} is not on a bpffs: the datapath cannot be pinned (mount -t bpf bpf /sys/fs/bpf)",
                cfg.bpffs_dir.display()
            ),
        )),
        Err(e) => Err(unavailable("the pinned datapath cannot be opened", &e)),
    }
}

/// Is `dir` (or, while it does not exist yet, its nearest existing ancestor) on a bpffs?
fn on_bpffs(dir: &Path) -> bool {
    let Some(existing) = dir.ancestors().find(|p| p.exists()) else {
        return false;
    };
    let Ok(c) = CString::new(existing.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: a valid C string and a zeroed out-struct the kernel fills.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::statfs(c.as_ptr(), &mut st) };
    rc == 0 && st.f_type as i64 == BPF_FS_MAGIC
}
