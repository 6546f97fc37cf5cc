//! Network namespaces: named ones (`ip netns add`) removed on drop, and a guard that
//! moves the current thread into a namespace and back (as aya's integration tests do).

use std::ffi::OsStr;
use std::fs::File;
use std::os::fd::AsFd as _;
use std::process::Command;

use nix::sched::{CloneFlags, setns};

use crate::util::try_run;

/// Makes the `Command` for a program: every command a [`NamedNetns`] runs (`ip`,
/// `nsenter`) starts from it. The tests use [`plain`]; xtask's benchmark passes one that
/// also gives each child a parent-death signal and a process group of its own.
pub type Spawner = fn(&OsStr) -> Command;

/// `Command::new`.
pub fn plain(program: &OsStr) -> Command {
    Command::new(program)
}

/// `ip netns add NAME`, with `lo` up; deleted on drop (unless it is a [`shared`]
/// handle).
///
/// [`shared`]: NamedNetns::shared
pub struct NamedNetns {
    pub name: String,
    spawner: Spawner,
    /// Deleted on drop: false for a handle to a namespace someone else owns.
    owned: bool,
}

impl NamedNetns {
    /// Creates the namespace (panics if that fails).
    pub fn new(name: &str) -> NamedNetns {
        Self::create(name, plain).unwrap_or_else(|e| panic!("{e:#}"))
    }

    /// Creates the namespace; its commands are made by `spawner`. On error nothing is
    /// left behind.
    pub fn create(name: &str, spawner: Spawner) -> anyhow::Result<NamedNetns> {
        try_run(spawner(OsStr::new("ip")).args(["netns", "add", name]))?;
        let ns = NamedNetns {
            name: name.to_owned(),
            spawner,
            owned: true,
        };
        ns.try_ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// Another handle to this namespace that does not delete it on drop (several
    /// topologies sharing one LAN); the owner must outlive it.
    pub fn shared(&self) -> NamedNetns {
        NamedNetns {
            name: self.name.clone(),
            spawner: self.spawner,
            owned: false,
        }
    }

    pub fn path(&self) -> String {
        format!("/run/netns/{}", self.name)
    }

    /// `nsenter --net=<this> PROGRAM ...` (nsenter, not `ip netns exec`, which remounts
    /// /sys and so hides /sys/fs/bpf and the cgroup mounts runc needs).
    pub fn cmd(&self, program: impl AsRef<OsStr>) -> Command {
        let mut c = (self.spawner)(OsStr::new("nsenter"));
        c.arg(format!("--net={}", self.path())).arg(program);
        c
    }

    /// Waits until something listens on `proto` ("tcp"/"udp") `port` in this namespace.
    pub fn wait_listen(&self, proto: &str, port: u16) {
        crate::util::wait_listen(&[&format!("--net={}", self.path())], proto, port);
    }

    /// Waits until `ss ARGS` (with -H) lists a socket in this namespace.
    pub fn wait_ss(&self, ss_args: &[&str]) {
        crate::util::wait_ss(&[&format!("--net={}", self.path())], ss_args);
    }

    /// `ip -n <this> ARGS`, must succeed; returns stdout.
    pub fn try_ip(&self, args: &[&str]) -> anyhow::Result<String> {
        try_run(
            (self.spawner)(OsStr::new("ip"))
                .arg("-n")
                .arg(&self.name)
                .args(args),
        )
    }

    /// `ip -n <this> ARGS`, must succeed (panics otherwise).
    pub fn ip(&self, args: &[&str]) -> String {
        self.try_ip(args).unwrap_or_else(|e| panic!("{e:#}"))
    }

    /// `sysctl -qw KEY=VALUE` in this namespace.
    pub fn sysctl(&self, kv: &str) -> anyhow::Result<()> {
        try_run(self.cmd("sysctl").args(["-qw", kv]))?;
        Ok(())
    }
}

impl Drop for NamedNetns {
    fn drop(&mut self) {
        if !self.owned {
            return;
        }
        let _ = (self.spawner)(OsStr::new("ip"))
            .args(["netns", "del", &self.name])
            .output();
    }
}

/// Enters a network namespace on this thread; restores the previous one on drop.
pub struct NetnsGuard {
    prev: File,
}

impl NetnsGuard {
    pub fn new(path: &str) -> NetnsGuard {
        let prev = File::open("/proc/thread-self/ns/net").expect("open own netns");
        let target = File::open(path).unwrap_or_else(|e| panic!("open {path}: {e}"));
        setns(target.as_fd(), CloneFlags::CLONE_NEWNET).expect("setns into target");
        NetnsGuard { prev }
    }
}

impl Drop for NetnsGuard {
    fn drop(&mut self) {
        setns(self.prev.as_fd(), CloneFlags::CLONE_NEWNET).expect("setns back");
    }
}
