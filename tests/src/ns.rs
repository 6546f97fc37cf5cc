//! Network namespaces: named ones (`ip netns add`) removed on drop, and a guard that
//! moves the current thread into a namespace and back (as aya's integration tests do).

use std::fs::File;
use std::os::fd::AsFd as _;
use std::process::Command;

use nix::sched::{CloneFlags, setns};

use crate::util::run;

/// `ip netns add NAME`, with `lo` up; deleted on drop.
pub struct NamedNetns {
    pub name: String,
}

impl NamedNetns {
    pub fn new(name: &str) -> NamedNetns {
        run(Command::new("ip").args(["netns", "add", name]));
        let ns = NamedNetns {
            name: name.to_owned(),
        };
        run(Command::new("ip").args(["-n", name, "link", "set", "lo", "up"]));
        ns
    }

    pub fn path(&self) -> String {
        format!("/run/netns/{}", self.name)
    }

    /// `nsenter --net=<this> PROGRAM ...` (nsenter, not `ip netns exec`, which remounts
    /// /sys and so hides /sys/fs/bpf and the cgroup mounts runc needs).
    pub fn cmd(&self, program: &str) -> Command {
        let mut c = Command::new("nsenter");
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

    /// `ip -n <this> ARGS`, must succeed.
    pub fn ip(&self, args: &[&str]) -> String {
        run(Command::new("ip").arg("-n").arg(&self.name).args(args))
    }
}

impl Drop for NamedNetns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
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
