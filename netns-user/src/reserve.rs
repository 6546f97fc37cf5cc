//! Mapped host ports in `ip_local_reserved_ports`, so the kernel never autobinds one
//! (a host client whose ephemeral port fell inside a mapped range would get its replies
//! DNATed into the container). One reservation covers TCP and UDP alike.
//!
//! Only what netns added is ever removed: [`RECORD`] in the state directory lists the
//! ports netns reserved for mappings. A port already reserved when it was mapped (by
//! the admin, or by the NAT range, which is never removed) is not netns's and stays.
//! Everything here runs under the state lock; the sysctl is per network namespace.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::network::portset::{PortSet, PortSetError};
use crate::network::sysctl::{self, RESERVED_PORTS, SysctlError};
use crate::store::{Locked, StoreError};

/// The ownership record in the state directory.
pub const RECORD: &str = "reserved-ports.json";

#[derive(Debug, thiserror::Error)]
pub enum ReserveError {
    #[error(transparent)]
    Sysctl(#[from] SysctlError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("corrupt {RECORD} in the state directory")]
    Record(#[source] PortSetError),
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Record {
    /// Compact ranges, as in the sysctl: `8080,40000-40099`.
    ports: String,
}

fn read_owned(lock: &Locked<'_>) -> Result<PortSet, ReserveError> {
    let r: Record = lock.read(RECORD)?.unwrap_or_default();
    r.ports.parse().map_err(ReserveError::Record)
}

fn write_owned(lock: &Locked<'_>, owned: &PortSet) -> Result<(), ReserveError> {
    Ok(lock.write(
        RECORD,
        &Record {
            ports: owned.to_string(),
        },
    )?)
}

/// What a sync changed in the sysctl.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Change {
    pub reserved: PortSet,
    pub released: PortSet,
}

impl Change {
    pub fn is_empty(&self) -> bool {
        self.reserved.is_empty() && self.released.is_empty()
    }
}

/// Makes the reservation follow the mapped host ports `mapped` (see
/// `portmap::host_ports`): reserves them, releases those netns reserved that are no
/// longer mapped.
pub fn sync(lock: &Locked<'_>, mapped: &PortSet) -> Result<Change, ReserveError> {
    sync_in(lock, Path::new(RESERVED_PORTS), mapped)
}

pub(crate) fn sync_in(
    lock: &Locked<'_>,
    path: &Path,
    desired: &PortSet,
) -> Result<Change, ReserveError> {
    let cur = sysctl::read_port_set(path)?;
    let owned = read_owned(lock)?;
    let add = desired.difference(&cur);
    // Ours, no longer mapped, still reserved. An owned port the admin has unreserved
    // meanwhile simply drops out of the record.
    let release = owned.difference(desired).intersection(&cur);
    let now_owned = owned.intersection(desired).union(&add);
    if !add.is_empty() {
        // Claim before reserving: a crash in between leaves a claim on an unreserved
        // port, which the next sync handles, never a reservation nobody owns.
        write_owned(lock, &owned.union(&add))?;
    }
    if !add.is_empty() || !release.is_empty() {
        sysctl::write_port_set(path, &cur.difference(&release).union(&add))?;
    }
    if now_owned != owned {
        write_owned(lock, &now_owned)?;
    }
    Ok(Change {
        reserved: add,
        released: release,
    })
}

/// Adds the NAT range to the reservation for good. Ports of it netns had reserved for
/// mappings are disowned first, so unmapping one never opens a hole in the range.
pub fn nat_range(lock: Option<&Locked<'_>>, min: u16, max: u16) -> Result<bool, ReserveError> {
    nat_range_in(lock, Path::new(RESERVED_PORTS), min, max)
}

pub(crate) fn nat_range_in(
    lock: Option<&Locked<'_>>,
    path: &Path,
    min: u16,
    max: u16,
) -> Result<bool, ReserveError> {
    if let Some(lock) = lock {
        let owned = read_owned(lock)?;
        let mut range = PortSet::new();
        range.insert_range(min, max);
        if !owned.intersection(&range).is_empty() {
            write_owned(lock, &owned.difference(&range))?;
        }
    }
    Ok(sysctl::reserve_in(path, min, max)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Store;

    fn set(s: &str) -> PortSet {
        s.parse().unwrap()
    }

    struct Fixture {
        _tmp: tempfile::TempDir,
        store: Store,
        sysctl: std::path::PathBuf,
    }

    fn fixture(initial: &str) -> Fixture {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::open(&tmp.path().join("state")).unwrap();
        let sysctl = tmp.path().join("ip_local_reserved_ports");
        std::fs::write(&sysctl, initial).unwrap();
        Fixture {
            _tmp: tmp,
            store,
            sysctl,
        }
    }

    impl Fixture {
        fn sysctl(&self) -> String {
            std::fs::read_to_string(&self.sysctl).unwrap()
        }
        fn record(&self) -> String {
            std::fs::read_to_string(self.store.dir().join(RECORD)).unwrap()
        }
    }

    #[test]
    fn reserves_and_releases_only_its_own_ports() {
        let f = fixture("22,8080\n");
        let l = f.store.lock().unwrap();
        let c = sync_in(&l, &f.sysctl, &set("8080,40000-40099")).unwrap();
        assert_eq!(c.reserved, set("40000-40099"));
        assert!(c.released.is_empty());
        assert_eq!(f.sysctl(), "22,8080,40000-40099\n");
        // 8080 was the admin's: not recorded as ours.
        assert_eq!(read_owned(&l).unwrap(), set("40000-40099"));
        // Nothing to do: no write.
        assert!(
            sync_in(&l, &f.sysctl, &set("8080,40000-40099"))
                .unwrap()
                .is_empty()
        );
        // Unmapping everything releases ours only.
        let c = sync_in(&l, &f.sysctl, &PortSet::new()).unwrap();
        assert_eq!(c.released, set("40000-40099"));
        assert_eq!(f.sysctl(), "22,8080\n");
        assert!(read_owned(&l).unwrap().is_empty());
        // Releasing the last one writes an empty list (clears the sysctl).
        let f = fixture("");
        let l = f.store.lock().unwrap();
        sync_in(&l, &f.sysctl, &set("5000")).unwrap();
        assert_eq!(f.sysctl(), "5000\n");
        sync_in(&l, &f.sysctl, &PortSet::new()).unwrap();
        assert_eq!(f.sysctl(), "\n");
    }

    #[test]
    fn partial_unmap_and_admin_changes() {
        let f = fixture("\n");
        let l = f.store.lock().unwrap();
        sync_in(&l, &f.sysctl, &set("7000-7009")).unwrap();
        let c = sync_in(&l, &f.sysctl, &set("7000-7004")).unwrap();
        assert_eq!(c.released, set("7005-7009"));
        assert_eq!(f.sysctl(), "7000-7004\n");
        // The admin unreserves 7001 and reserves 9000 by hand.
        std::fs::write(&f.sysctl, "7000,7002-7004,9000\n").unwrap();
        // Still mapped: 7001 comes back (still ours). 9000 stays the admin's.
        let c = sync_in(&l, &f.sysctl, &set("7000-7004,9000")).unwrap();
        assert_eq!(c.reserved, set("7001"));
        assert_eq!(read_owned(&l).unwrap(), set("7000-7004"));
        sync_in(&l, &f.sysctl, &PortSet::new()).unwrap();
        assert_eq!(f.sysctl(), "9000\n");
        // An owned port the admin unreserved is dropped from the record, not re-added.
        sync_in(&l, &f.sysctl, &set("7100")).unwrap();
        std::fs::write(&f.sysctl, "9000\n").unwrap();
        assert!(sync_in(&l, &f.sysctl, &PortSet::new()).unwrap().is_empty());
        assert!(read_owned(&l).unwrap().is_empty());
        assert_eq!(f.sysctl(), "9000\n");
    }

    #[test]
    fn record_file_format_and_mode() {
        use std::os::unix::fs::MetadataExt as _;
        let f = fixture("\n");
        let l = f.store.lock().unwrap();
        sync_in(&l, &f.sysctl, &set("80,443,8000-8100")).unwrap();
        let v: serde_json::Value = serde_json::from_str(&f.record()).unwrap();
        assert_eq!(v, serde_json::json!({"ports": "80,443,8000-8100"}));
        let mode = std::fs::metadata(f.store.dir().join(RECORD))
            .unwrap()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        std::fs::write(f.store.dir().join(RECORD), r#"{"ports": "1-x"}"#).unwrap();
        let e = sync_in(&l, &f.sysctl, &PortSet::new()).unwrap_err();
        assert!(matches!(e, ReserveError::Record(_)), "{e}");
    }

    #[test]
    fn nat_range_disowns_its_ports() {
        let f = fixture("\n");
        let l = f.store.lock().unwrap();
        sync_in(&l, &f.sysctl, &set("8080,62000")).unwrap();
        assert!(nat_range_in(Some(&l), &f.sysctl, 61000, 65535).unwrap());
        assert_eq!(read_owned(&l).unwrap(), set("8080"));
        // Unmapping 62000 must not open a hole in the NAT range.
        sync_in(&l, &f.sysctl, &PortSet::new()).unwrap();
        assert_eq!(f.sysctl(), "61000-65535\n");
        // Without a state directory: just the sysctl.
        assert!(!nat_range_in(None, &f.sysctl, 61000, 65535).unwrap());
    }

    #[test]
    fn missing_sysctl_is_named() {
        let f = fixture("");
        std::fs::remove_file(&f.sysctl).unwrap();
        let l = f.store.lock().unwrap();
        let e = sync_in(&l, &f.sysctl, &set("1")).unwrap_err().to_string();
        assert!(e.contains("ip_local_reserved_ports"), "{e}");
    }
}
