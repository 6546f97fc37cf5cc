//! Where the socket programs attach: `--cgroup auto|none|PATH`.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error(
        "--cgroup auto: no cgroup2 filesystem in /proc/self/mountinfo (pass --cgroup PATH or none)"
    )]
    NoCgroup2,
    #[error("--cgroup {0}: not a directory")]
    NotADir(PathBuf),
    #[error("reading /proc/self/mountinfo")]
    Mountinfo(#[source] std::io::Error),
}

/// The cgroup directory to attach to, None for "none".
pub fn resolve(flag: &str) -> Result<Option<PathBuf>, CgroupError> {
    match flag {
        "none" | "" => Ok(None),
        "auto" => {
            let mi =
                std::fs::read_to_string("/proc/self/mountinfo").map_err(CgroupError::Mountinfo)?;
            cgroup2_mount(&mi).map(Some).ok_or(CgroupError::NoCgroup2)
        }
        p => {
            let p = PathBuf::from(p);
            if p.is_dir() {
                Ok(Some(p))
            } else {
                Err(CgroupError::NotADir(p))
            }
        }
    }
}

/// The mount point of the first cgroup2 filesystem in a mountinfo text.
fn cgroup2_mount(mountinfo: &str) -> Option<PathBuf> {
    netns_common::cgroup2_mount(mountinfo).map(PathBuf::from)
}

#[cfg(test)]
mod tests {
    #[test]
    fn finds_cgroup2_mount() {
        let mi = "35 25 0:30 / /sys/fs/cgroup ro,nosuid - tmpfs tmpfs ro\n\
                  36 35 0:31 / /sys/fs/cgroup/unified rw,nosuid - cgroup2 cgroup2 rw\n";
        assert_eq!(
            super::cgroup2_mount(mi),
            Some("/sys/fs/cgroup/unified".into())
        );
        assert_eq!(
            super::cgroup2_mount("1 2 0:3 / / rw - ext4 /dev/vda rw\n"),
            None
        );
    }
}
