//! A small JSON file store under the state directory.
//!
//! Every access holds an `flock` on `<state>/lock`, so concurrent hook processes
//! serialise. Writes go to a temporary file that is fsynced and renamed over the
//! target, then the directory is fsynced: a crash leaves the old or the new
//! content, never a torn file.

use std::fs::{self, File, OpenOptions};
use std::io::{ErrorKind, Write as _};
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};
use serde::Serialize;
use serde::de::DeserializeOwned;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{what} {}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("corrupt state file {}", path.display())]
    Corrupt {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("{} is not a plain file name", .0)]
    BadName(String),
}

fn io_err(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> StoreError {
    let path = path.to_owned();
    move |source| StoreError::Io { what, path, source }
}

/// The state directory.
#[derive(Debug, Clone)]
pub struct Store {
    dir: PathBuf,
}

/// Proof that the store's lock is held; all reads and writes go through it.
#[derive(Debug)]
pub struct Locked<'a> {
    store: &'a Store,
    _flock: Flock<File>,
}

impl Store {
    /// Creates the directory (0700: it names containers and their addresses) if needed.
    pub fn open(dir: &Path) -> Result<Store, StoreError> {
        match fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
        {
            Ok(()) => {}
            Err(e) => return Err(io_err("creating state directory", dir)(e)),
        }
        // A directory made by someone else keeps its mode (it may be shared, such as
        // /tmp); the files in it are 0600 whatever it is.
        if let Ok(m) = fs::metadata(dir)
            && m.permissions().mode() & 0o077 != 0
        {
            log::warn!(
                "state directory {} has mode {:o}: other users can list it (use a 0700 directory)",
                dir.display(),
                m.permissions().mode() & 0o7777
            );
        }
        Ok(Store {
            dir: dir.to_owned(),
        })
    }

    /// Like [`Store::open`] but never creates anything: `None` if the directory is absent
    /// (read-only commands such as `ls` should not leave directories behind).
    pub fn open_existing(dir: &Path) -> Result<Option<Store>, StoreError> {
        match fs::metadata(dir) {
            Ok(m) if m.is_dir() => Ok(Some(Store {
                dir: dir.to_owned(),
            })),
            Ok(_) => Err(io_err("not a directory:", dir)(
                ErrorKind::NotADirectory.into(),
            )),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_err("reading state directory", dir)(e)),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Takes the exclusive lock (blocks while another process holds it).
    pub fn lock(&self) -> Result<Locked<'_>, StoreError> {
        self.lock_with(FlockArg::LockExclusive)
    }

    /// Takes a shared lock (readers only).
    pub fn lock_shared(&self) -> Result<Locked<'_>, StoreError> {
        self.lock_with(FlockArg::LockShared)
    }

    fn lock_with(&self, arg: FlockArg) -> Result<Locked<'_>, StoreError> {
        let path = self.dir.join("lock");
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .custom_flags(libc::O_CLOEXEC)
            .open(&path)
            .map_err(io_err("opening lock file", &path))?;
        // An older file may have been left wider.
        if f.metadata()
            .is_ok_and(|m| m.permissions().mode() & 0o077 != 0)
            && let Err(e) = f.set_permissions(fs::Permissions::from_mode(0o600))
        {
            log::warn!("could not make {} mode 600: {e}", path.display());
        }
        let flock = Flock::lock(f, arg).map_err(|(_, e)| io_err("locking", &path)(e.into()))?;
        Ok(Locked {
            store: self,
            _flock: flock,
        })
    }
}

impl Locked<'_> {
    pub fn store(&self) -> &Store {
        self.store
    }

    fn path(&self, name: &str) -> Result<PathBuf, StoreError> {
        if name.is_empty() || name.contains('/') || name.starts_with('.') || name == "lock" {
            return Err(StoreError::BadName(name.to_owned()));
        }
        Ok(self.store.dir.join(name))
    }

    /// Reads `name`, `None` if it does not exist.
    pub fn read<T: DeserializeOwned>(&self, name: &str) -> Result<Option<T>, StoreError> {
        let path = self.path(name)?;
        let data = match fs::read(&path) {
            Ok(d) => d,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_err("reading", &path)(e)),
        };
        serde_json::from_slice(&data)
            .map(Some)
            .map_err(|source| StoreError::Corrupt { path, source })
    }

    /// Atomically replaces `name` with `value` as JSON (mode 0600).
    pub fn write<T: Serialize>(&self, name: &str, value: &T) -> Result<(), StoreError> {
        let path = self.path(name)?;
        let mut data = serde_json::to_vec_pretty(value).expect("state types serialize");
        data.push(b'\n');
        // The lock is held, so one fixed temporary name per target is enough.
        let tmp = self.store.dir.join(format!(".{name}.tmp"));
        let write = || -> std::io::Result<()> {
            let mut f = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .custom_flags(libc::O_CLOEXEC)
                .open(&tmp)?;
            // An earlier umask or owner may have left wider permissions.
            f.set_permissions(fs::Permissions::from_mode(0o600))?;
            f.write_all(&data)?;
            f.sync_all()
        };
        write().map_err(io_err("writing", &tmp))?;
        fs::rename(&tmp, &path).map_err(io_err("renaming temporary file onto", &path))?;
        self.sync_dir()
    }

    /// Removes `name` (no error if absent).
    pub fn remove(&self, name: &str) -> Result<(), StoreError> {
        let path = self.path(name)?;
        match fs::remove_file(&path) {
            Ok(()) => self.sync_dir(),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_err("removing", &path)(e)),
        }
    }

    /// Makes the rename durable.
    fn sync_dir(&self) -> Result<(), StoreError> {
        let d = &self.store.dir;
        File::open(d)
            .and_then(|f| f.sync_all())
            .map_err(io_err("syncing state directory", d))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt as _;

    #[test]
    fn roundtrip_modes_and_names() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("state");
        let store = Store::open(&dir).unwrap();
        assert_eq!(fs::metadata(&dir).unwrap().mode() & 0o777, 0o700);
        let l = store.lock().unwrap();
        assert_eq!(l.read::<Vec<u32>>("x.json").unwrap(), None);
        l.write("x.json", &vec![1u32, 2]).unwrap();
        assert_eq!(l.read::<Vec<u32>>("x.json").unwrap(), Some(vec![1, 2]));
        assert_eq!(
            fs::metadata(dir.join("x.json")).unwrap().mode() & 0o777,
            0o600
        );
        assert_eq!(
            fs::metadata(dir.join("lock")).unwrap().mode() & 0o777,
            0o600
        );
        assert!(!dir.join(".x.json.tmp").exists());
        l.remove("x.json").unwrap();
        l.remove("x.json").unwrap();
        for bad in ["", "a/b", ".hidden", "lock"] {
            assert!(
                matches!(l.read::<u32>(bad), Err(StoreError::BadName(_))),
                "{bad}"
            );
        }
        fs::write(dir.join("bad.json"), b"{").unwrap();
        assert!(matches!(
            l.read::<u32>("bad.json"),
            Err(StoreError::Corrupt { .. })
        ));
    }

    #[test]
    fn open_existing_does_not_create() {
        let tmp = tempfile::tempdir().unwrap();
        assert!(
            Store::open_existing(&tmp.path().join("nope"))
                .unwrap()
                .is_none()
        );
        assert!(!tmp.path().join("nope").exists());
        assert!(Store::open_existing(tmp.path()).unwrap().is_some());
    }
}
