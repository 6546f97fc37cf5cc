//! Datapaths of other layout versions. Each version pins under its own `v<N>`
//! directory, so after an upgrade the old version's TCX and cgroup links would stay
//! attached next to the new ones and both would process every packet. Ensuring this
//! version loaded therefore detaches and removes every other `v<N>`.

use std::ffi::OsStr;
use std::fs;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};

use netns_common::LAYOUT_VERSION;
use nix::fcntl::{Flock, FlockArg};

use super::{DatapathError, io, sys};

/// The layout version a directory name stands for: exactly `v<N>` as [`super::Pins`]
/// writes it (no sign, no leading zero), so nothing else in the directory is touched.
fn version_of(name: &OsStr) -> Option<u32> {
    let digits = name.to_str()?.strip_prefix('v')?;
    if digits.is_empty()
        || !digits.bytes().all(|b| b.is_ascii_digit())
        || (digits.len() > 1 && digits.starts_with('0'))
    {
        return None;
    }
    digits.parse().ok()
}

/// The `(version, directory)` of every other layout version under `bpffs_dir`, oldest
/// first. Only real directories count (a symlink may point anywhere).
pub(super) fn other_versions(
    bpffs_dir: &Path,
    current: u32,
) -> std::io::Result<Vec<(u32, PathBuf)>> {
    let rd = match fs::read_dir(bpffs_dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut out = Vec::new();
    for e in rd {
        let e = e?;
        let Some(v) = version_of(&e.file_name()) else {
            continue;
        };
        if v != current && e.file_type()?.is_dir() {
            out.push((v, e.path()));
        }
    }
    out.sort();
    Ok(out)
}

/// Detaches and removes every other version's pins. An old version whose loader lock
/// is held (a hook of that version is running right now) is left for the next load.
pub(super) fn remove_old_versions(bpffs_dir: &Path) -> Result<(), DatapathError> {
    let old = other_versions(bpffs_dir, LAYOUT_VERSION)
        .map_err(io(format!("listing {}", bpffs_dir.display())))?;
    for (v, dir) in old {
        let f = fs::File::open(&dir).map_err(io(format!("opening {}", dir.display())))?;
        let _lock = match Flock::lock(f, FlockArg::LockExclusiveNonblock) {
            Ok(l) => l,
            Err((_, nix::errno::Errno::EWOULDBLOCK)) => {
                log::warn!(
                    "datapath layout v{v} ({}) is being loaded by a netns of that version: \
                     not removed this time",
                    dir.display()
                );
                continue;
            }
            Err((_, e)) => {
                return Err(io(format!("locking {}", dir.display()))(e.into()));
            }
        };
        let detached = detach_links(&dir.join("links"));
        // Unpinning drops the pins' references: maps and programs go once unused, and
        // a link BPF_LINK_DETACH could not detach goes with its last reference.
        fs::remove_dir_all(&dir).map_err(io(format!(
            "removing the datapath of layout v{v} ({})",
            dir.display()
        )))?;
        log::warn!(
            "removed the datapath of layout v{v} ({}): {detached} link(s) detached",
            dir.display()
        );
    }
    Ok(())
}

/// BPF_LINK_DETACH on every pinned link in `links`; returns how many it detached.
fn detach_links(links: &Path) -> usize {
    let Ok(rd) = fs::read_dir(links) else {
        return 0;
    };
    let mut n = 0;
    for pin in rd.flatten().map(|e| e.path()) {
        match sys::link_detach(&pin) {
            Ok(()) => n += 1,
            Err(e) => log::warn!(
                "could not detach {} ({e}); removing its pin detaches it unless a process \
                 still holds it (a `netns load --follow` of that version: stop it)",
                pin.display()
            ),
        }
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_names() {
        let v = |s: &str| version_of(OsStr::new(s));
        assert_eq!(v("v1"), Some(1));
        assert_eq!(v("v10"), Some(10));
        assert_eq!(v("v0"), Some(0));
        for bad in [
            "v",
            "v01",
            "v1.bak",
            "v-1",
            "v+1",
            "1",
            "V1",
            "vx",
            "v 1",
            "v99999999999",
        ] {
            assert_eq!(v(bad), None, "{bad}");
        }
    }

    #[test]
    fn selects_other_version_directories_only() {
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path();
        for sub in ["v1", "v2", "v3", "v01", "vfoo", "other"] {
            fs::create_dir(d.join(sub)).unwrap();
        }
        fs::write(d.join("v4"), b"").unwrap();
        std::os::unix::fs::symlink(d.join("v1"), d.join("v5")).unwrap();
        let got = other_versions(d, 2).unwrap();
        assert_eq!(got, [(1, d.join("v1")), (3, d.join("v3"))]);
        assert!(other_versions(&d.join("missing"), 2).unwrap().is_empty());
    }

    #[test]
    fn removes_other_versions_but_not_this_one() {
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path();
        let cur = format!("v{LAYOUT_VERSION}");
        let old = format!("v{}", LAYOUT_VERSION + 7);
        for sub in [&cur, &old] {
            fs::create_dir_all(d.join(sub).join("links")).unwrap();
            // Not a bpffs: detaching fails and is only logged; removal still happens.
            fs::write(d.join(sub).join("links/uplink-egress"), b"").unwrap();
        }
        remove_old_versions(d).unwrap();
        assert!(d.join(&cur).join("links/uplink-egress").exists());
        assert!(!d.join(&old).exists());
    }
}
