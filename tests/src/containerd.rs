//! containerd 1.6 and `ctr run --cni` in a topology's host namespace, with nothing of the
//! machine's own: containerd gets a private `--config` (root, state, socket; the plugins
//! a `--rootfs` run does not need disabled, `opt` among them, which would create
//! /opt/containerd), and runs in a private mount namespace in which private directories
//! are bind-mounted over the paths containerd 1.6 and ctr hard-code:
//! - /etc/cni/net.d and /opt/cni/bin: where `ctr run --cni` (go-cni's defaults) reads the
//!   network configuration and finds the plugins;
//! - /run/containerd: the shim's socket (`/run/containerd/s/…`), runc's root and ctr's
//!   fifos are there whatever `--state` says;
//! - /var/lib/cni: libcni's result cache.
//!
//! A mount point that does not exist on the machine is made inside an overlay of its
//! nearest existing ancestor, mounted only in that mount namespace
//! ([`in_private_mounts`]): the machine's filesystem is never written. `ctr` joins containerd's
//! mount and network namespaces (`nsenter -t PID -m -n`). Drop kills the tasks,
//! containerd, its shims and anything still running from the rootfs, then removes the
//! directory; the mount namespace goes with its last process.

use std::fs;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use crate::clients::in_private_mounts;
use crate::podman::{Proc, processes_mentioning};
use crate::topo::Topology;
use crate::util::{ChildGuard, busybox_rootfs, descendants, output, run, unique, wait_for};

/// The plugins a `ctr run --rootfs` does not use: they would only slow the start
/// (snapshotters probing), serve on ports (cri) or write outside the private root
/// (`opt`: /opt/containerd).
const DISABLED_PLUGINS: &[&str] = &[
    "io.containerd.grpc.v1.cri",
    "io.containerd.internal.v1.opt",
    "io.containerd.internal.v1.tracing",
    "io.containerd.tracing.processor.v1.otlp",
    "io.containerd.snapshotter.v1.aufs",
    "io.containerd.snapshotter.v1.btrfs",
    "io.containerd.snapshotter.v1.devmapper",
    "io.containerd.snapshotter.v1.zfs",
];

/// The paths containerd 1.6 / ctr use whatever the configuration says, and which
/// private directory (under [`Containerd::dir`]) stands in for each.
const SHADOWED: &[(&str, &str)] = &[
    ("/etc/cni/net.d", "cni-conf"),
    ("/opt/cni/bin", "cni-bin"),
    ("/run/containerd", "run"),
    // libcni's result cache (go-cni keeps libcni's default).
    ("/var/lib/cni", "cni-cache"),
];

/// One private containerd for a topology.
pub struct Containerd<'t> {
    pub topo: &'t Topology,
    /// Everything of this containerd lives here (config, root, state, socket, the
    /// shadowing directories, rootfs).
    pub dir: PathBuf,
    /// A busybox-static rootfs for `ctr run --rootfs`.
    pub rootfs: PathBuf,
    /// The gRPC socket (`ctr --address`).
    pub address: PathBuf,
    /// containerd itself (the `unshare` process exec'd into it).
    daemon: Option<ChildGuard>,
}

impl<'t> Containerd<'t> {
    /// Starts containerd for `topo` and waits until it serves. Panics if containerd or
    /// ctr is missing: CI installs them (scripts/setup.sh), so that is a failure.
    pub fn new(topo: &'t Topology) -> Containerd<'t> {
        for tool in ["containerd", "ctr", "containerd-shim-runc-v2"] {
            let found = std::env::var_os("PATH")
                .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()));
            assert!(
                found,
                "{tool} is missing: `bash scripts/setup.sh` installs it (Debian package containerd)"
            );
        }
        let dir = topo.path(&unique("ctrd"));
        let rootfs = dir.join("rootfs");
        busybox_rootfs(&rootfs);
        for d in ["root", "state", "layers"]
            .into_iter()
            .chain(SHADOWED.iter().map(|(_, d)| *d))
        {
            fs::create_dir_all(dir.join(d)).expect("containerd dir");
        }
        let address = dir.join("containerd.sock");
        let q = |p: &Path| serde_json::to_string(&p.display().to_string()).expect("toml string");
        let config = format!(
            "version = 2\nroot = {}\nstate = {}\ndisabled_plugins = {}\n\
             [grpc]\n  address = {}\n[ttrpc]\n  address = {}\n\
             [debug]\n  address = \"\"\n[metrics]\n  address = \"\"\n",
            q(&dir.join("root")),
            q(&dir.join("state")),
            serde_json::to_string(DISABLED_PLUGINS).expect("toml array"),
            q(&address),
            q(&dir.join("containerd.sock.ttrpc")),
        );
        fs::write(dir.join("config.toml"), config).expect("config.toml");
        let log = fs::File::create(dir.join("containerd.log")).expect("containerd.log");
        let shadows: Vec<(&str, PathBuf)> =
            SHADOWED.iter().map(|(t, d)| (*t, dir.join(d))).collect();
        let shadows: Vec<(&str, &Path)> = shadows.iter().map(|(t, d)| (*t, d.as_path())).collect();
        let config = dir.join("config.toml");
        let mut cmd = in_private_mounts(
            topo,
            &dir.join("layers"),
            &shadows,
            &[
                "containerd".as_ref(),
                "--config".as_ref(),
                config.as_os_str(),
            ],
        );
        cmd.stdin(Stdio::null())
            .stdout(log.try_clone().expect("log fd"))
            .stderr(log);
        let mut c = Containerd {
            topo,
            dir,
            rootfs,
            address,
            daemon: Some(ChildGuard::spawn(&mut cmd)),
        };
        let up = wait_for(Duration::from_secs(20), || {
            if let Some(d) = c.daemon.as_mut()
                && d.0.try_wait().ok().flatten().is_some()
            {
                return Some(false);
            }
            c.ctr(&["version"])
                .output()
                .is_ok_and(|o| o.status.success())
                .then_some(true)
        });
        assert!(
            up == Some(true),
            "containerd did not start: {}",
            fs::read_to_string(c.dir.join("containerd.log")).unwrap_or_default()
        );
        c
    }

    /// containerd's pid (ctr joins its namespaces).
    pub fn pid(&self) -> u32 {
        self.daemon.as_ref().expect("containerd runs").0.id()
    }

    /// Installs the network configuration list `conflist` where `ctr run --cni` reads
    /// it, and the plugin: `netns` (the binary under test) and the reference plugins a
    /// configuration may name, as copies (symlinks would do too: /usr/lib/cni is not
    /// shadowed).
    pub fn install_network(&self, conflist: &serde_json::Value) {
        let name = conflist["name"].as_str().expect("conflist name");
        fs::write(
            self.dir.join(format!("cni-conf/10-{name}.conflist")),
            serde_json::to_vec_pretty(conflist).expect("json"),
        )
        .expect("conflist");
        let bin = self.dir.join("cni-bin");
        let _ = symlink(self.topo.bin(), bin.join("netns"));
        for r in ["loopback", "host-local", "portmap", "bridge"] {
            let src = Path::new("/usr/lib/cni").join(r);
            assert!(
                src.exists(),
                "{} is missing: `bash scripts/setup.sh` installs containernetworking-plugins",
                src.display()
            );
            let _ = symlink(src, bin.join(r));
        }
    }

    /// `ctr --address SOCK ARGS` in containerd's mount and network namespaces.
    pub fn ctr(&self, args: &[&str]) -> Command {
        let mut c = Command::new("nsenter");
        c.args([
            "-t",
            &self.pid().to_string(),
            "-m",
            "-n",
            "ctr",
            "--address",
        ])
        .arg(&self.address)
        .args(args)
        .stdin(Stdio::null());
        c
    }

    /// `ctr ARGS`, any outcome.
    pub fn output(&self, args: &[&str]) -> Output {
        output(&mut self.ctr(args))
    }

    /// `ctr run --cni --rootfs ROOTFS ID COMMAND...` in the foreground, as a background
    /// process of the test (ctr itself calls the plugin's DEL when the task exits, and
    /// only in the foreground: a detached `ctr run -d` never does). PATH is set: a
    /// `--rootfs` run has no image config to give it one.
    pub fn run_cni(&self, id: &str, command: &[&str]) -> ChildGuard {
        let mut c = self.ctr(&["run", "--cni", "--env", "PATH=/bin", "--rootfs"]);
        c.arg(&self.rootfs)
            .arg(id)
            .args(command)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        ChildGuard::spawn(&mut c)
    }

    /// `ctr run -d --cni --rootfs ROOTFS ID COMMAND...`, any outcome: ctr returns once
    /// the task runs, and nothing ever calls the plugin's DEL for it.
    pub fn run_cni_detached(&self, id: &str, command: &[&str]) -> Output {
        let mut c = self.ctr(&["run", "-d", "--cni", "--env", "PATH=/bin", "--rootfs"]);
        c.arg(&self.rootfs).arg(id).args(command);
        output(&mut c)
    }

    /// The pid of task `id` once it runs (`ctr task ls`), waiting up to 20 s.
    pub fn task_pid(&self, id: &str) -> u32 {
        wait_for(Duration::from_secs(20), || {
            let o = self.output(&["task", "ls"]);
            String::from_utf8_lossy(&o.stdout).lines().find_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                (f.first() == Some(&id) && f.get(2) == Some(&"RUNNING"))
                    .then(|| f[1].parse().ok())
                    .flatten()
            })
        })
        .unwrap_or_else(|| {
            panic!(
                "task {id} is not running after 20 s: {}",
                String::from_utf8_lossy(&self.output(&["task", "ls"]).stdout)
            )
        })
    }

    /// `ctr container ls -q`: the container ids.
    pub fn containers(&self) -> Vec<String> {
        run(&mut self.ctr(&["container", "ls", "-q"]))
            .lines()
            .map(str::to_owned)
            .collect()
    }

    /// The live processes that belong to this containerd: containerd, its shims and a
    /// ctr (their command lines name the directory) and their descendants (a container's
    /// processes are the shim's children); never this process.
    pub fn processes(&self) -> Vec<Proc> {
        let mut found = processes_mentioning(&self.dir);
        let roots: Vec<u32> = found.iter().map(|p| p.pid).collect();
        for pid in roots.into_iter().flat_map(descendants) {
            if found.iter().any(|p| p.pid == pid) {
                continue;
            }
            let proc_dir = PathBuf::from(format!("/proc/{pid}"));
            let cmdline = fs::read(proc_dir.join("cmdline")).unwrap_or_default();
            if cmdline.is_empty() {
                continue; // a zombie
            }
            found.push(Proc {
                pid,
                exe: fs::read_link(proc_dir.join("exe")).unwrap_or_default(),
                args: cmdline
                    .split(|c| *c == 0)
                    .filter(|a| !a.is_empty())
                    .map(|a| String::from_utf8_lossy(a).into_owned())
                    .collect(),
            });
        }
        found
    }

    /// Stops everything (tasks, containers, containerd, shims, stray container
    /// processes); idempotent. Returns what had to be SIGKILLed after containerd and
    /// its shims were asked to stop, i.e. what would have been left behind.
    pub fn stop(&mut self) -> Vec<Proc> {
        if self.daemon.is_none() {
            return vec![];
        }
        for id in self.containers_quiet() {
            let _ = self.output(&["task", "kill", "-s", "SIGKILL", &id]);
            let _ = self.output(&["task", "rm", "-f", &id]);
            let _ = self.output(&["container", "rm", &id]);
        }
        // SIGTERM: containerd exits; idle shims exit once their tasks are gone.
        if let Some(d) = &self.daemon {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(d.0.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
        let daemon = self.daemon.take().expect("checked");
        let _ = daemon.wait_output(Duration::from_secs(10));
        let _ = wait_for(Duration::from_secs(10), || {
            self.processes().is_empty().then_some(())
        });
        let left = self.processes();
        for p in &left {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(p.pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        left
    }

    fn containers_quiet(&self) -> Vec<String> {
        String::from_utf8_lossy(&self.output(&["container", "ls", "-q"]).stdout)
            .lines()
            .map(str::to_owned)
            .collect()
    }
}

impl Drop for Containerd<'_> {
    fn drop(&mut self) {
        self.stop();
        // The mounts were all in containerd's mount namespace, gone with its last
        // process: the directory is plain files now.
        let _ = wait_for(Duration::from_secs(5), || {
            fs::remove_dir_all(&self.dir).is_ok().then_some(())
        });
    }
}
