//! podman 4.3 (runc, hooks.d) in a topology's host namespace, as
//! shared/notes/real-clients.md describes it: private storage, run and tmp directories,
//! a private containers.conf (CNI backend with a private config dir, for the default
//! network), and the netns hook in a private hooks directory, configured through its
//! `env` (podman gives a hook only that environment); or ([`Podman::with_cni`]) no hook
//! and the netns CNI plugin as podman's network. Everything is removed on drop.

use std::fs;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use crate::clients::in_private_mounts;
use crate::topo::{Topology, UPLINK};
use crate::util::{ChildGuard, busybox_rootfs, output, run, unique, wait_for};

/// The subnet of podman's own default network (CNI bridge) in [`Podman::new`]'s config:
/// TEST-NET-3, and only ever inside the topology's private host namespace.
pub const DEFAULT_NET_SUBNET: &str = "203.0.113.0/24";

/// One podman "installation" for a topology.
pub struct Podman<'t> {
    pub topo: &'t Topology,
    /// Everything of this podman lives here (root, runroot, tmpdir, configs, rootfs).
    pub dir: PathBuf,
    /// A busybox-static rootfs for `--rootfs`.
    pub rootfs: PathBuf,
    /// The process holding the private mount namespace every podman command joins
    /// (podman keeps libcni's default result cache, /var/lib/cni: a private directory
    /// is mounted over it there).
    mounts: Option<ChildGuard>,
}

impl<'t> Podman<'t> {
    /// Sets podman up for `topo`: its hook runs the topology's `netns` with the
    /// topology's state and bpffs directories and uplink (`--cgroup none`), plus the
    /// topology's extra flags as arguments. Panics if podman is missing: CI installs it
    /// (scripts/setup.sh), so a missing podman is a failure, not a skip.
    pub fn new(topo: &'t Topology) -> Podman<'t> {
        let p = Self::setup(topo);
        p.write_hook();
        p.write_config();
        p
    }

    /// Sets podman up for `topo` with the netns CNI plugin instead of the hook: the
    /// network configuration list `conflist` (its `name` is podman's network name and
    /// the default network) in a private `network_config_dir`, and a private
    /// `cni_plugin_dirs` holding `netns` (the binary under test) and the reference
    /// plugins a configuration may name. No hook: hooks.d stays empty.
    pub fn with_cni(topo: &'t Topology, conflist: &serde_json::Value) -> Podman<'t> {
        let p = Self::setup(topo);
        let name = conflist["name"].as_str().expect("conflist name");
        let bin = p.dir.join("cni-bin");
        fs::create_dir_all(&bin).expect("cni-bin");
        symlink(topo.bin(), bin.join("netns")).expect("plugin link");
        for r in ["loopback", "host-local", "portmap", "bridge"] {
            let src = Path::new("/usr/lib/cni").join(r);
            assert!(
                src.exists(),
                "{} is missing: `bash scripts/setup.sh` installs containernetworking-plugins",
                src.display()
            );
            symlink(src, bin.join(r)).expect("reference plugin link");
        }
        let conf = format!(
            "[network]\nnetwork_backend = \"cni\"\nnetwork_config_dir = \"{}\"\n\
             cni_plugin_dirs = [\"{}\"]\ndefault_network = \"{name}\"\n",
            p.dir.join("cni").display(),
            bin.display()
        );
        fs::write(p.dir.join("containers.conf"), conf).expect("containers.conf");
        fs::write(
            p.dir.join(format!("cni/{name}.conflist")),
            serde_json::to_vec_pretty(conflist).expect("json"),
        )
        .expect("conflist");
        p
    }

    /// The directories and rootfs both set-ups share (no configuration yet).
    fn setup(topo: &'t Topology) -> Podman<'t> {
        let version = Command::new("podman").arg("--version").output();
        assert!(
            version.as_ref().is_ok_and(|o| o.status.success()),
            "podman is missing ({version:?}): `bash scripts/setup.sh` installs it (Debian package podman)"
        );
        let dir = topo.path(&unique("podman"));
        let rootfs = dir.join("rootfs");
        busybox_rootfs(&rootfs);
        for d in [
            "root",
            "runroot",
            "tmp",
            "hooks.d",
            "cni",
            "cni-ipam",
            "cni-cache",
            "layers",
        ] {
            fs::create_dir_all(dir.join(d)).expect("podman dir");
        }
        let cache = dir.join("cni-cache");
        let mut holder = in_private_mounts(
            topo,
            &dir.join("layers"),
            &[("/var/lib/cni", &cache)],
            &["sleep".as_ref(), "infinity".as_ref()],
        );
        holder.stdin(Stdio::null()).stdout(Stdio::null());
        let mounts = ChildGuard::spawn(&mut holder);
        // Ready once its mount namespace has the cache mounted.
        let pid = mounts.0.id();
        let ready = wait_for(Duration::from_secs(10), || {
            let mi = fs::read_to_string(format!("/proc/{pid}/mountinfo")).ok()?;
            mi.lines()
                .any(|l| l.split(' ').nth(4) == Some("/var/lib/cni"))
                .then_some(())
        });
        assert!(
            ready.is_some(),
            "the private mount namespace for podman did not come up"
        );
        Podman {
            topo,
            dir,
            rootfs,
            mounts: Some(mounts),
        }
    }

    /// hooks.d/netns.json: prestart + poststop, the topology's settings in `env`.
    fn write_hook(&self) {
        let t = self.topo;
        let mut args = vec!["netns".to_owned()];
        args.extend(t.extra.iter().cloned());
        let hook = serde_json::json!({
            "version": "1.0.0",
            "hook": {
                "path": t.bin(),
                "args": args,
                "timeout": 60,
                "env": [
                    format!("NETNS_STATE_DIR={}", t.state_dir.display()),
                    format!("NETNS_BPFFS_DIR={}", t.bpffs_dir.display()),
                    format!("NETNS_UPLINK={UPLINK}"),
                    "NETNS_CGROUP=none".to_owned(),
                ],
            },
            "when": { "always": true },
            "stages": ["prestart", "poststop"],
        });
        fs::write(
            self.dir.join("hooks.d/netns.json"),
            serde_json::to_vec_pretty(&hook).expect("json"),
        )
        .expect("write hook");
    }

    /// containers.conf (the only one podman reads, through CONTAINERS_CONF) and the
    /// default network "podman": a CNI bridge with host-local addresses, both in private
    /// directories, so podman touches neither /etc/cni nor /var/lib/cni.
    fn write_config(&self) {
        let conf = format!(
            "[network]\nnetwork_backend = \"cni\"\nnetwork_config_dir = \"{}\"\n\
             cni_plugin_dirs = [\"/usr/lib/cni\"]\ndefault_network = \"podman\"\n",
            self.dir.join("cni").display()
        );
        fs::write(self.dir.join("containers.conf"), conf).expect("containers.conf");
        let net = serde_json::json!({
            "cniVersion": "0.4.0",
            "name": "podman",
            "plugins": [{
                "type": "bridge",
                "bridge": "cni-podman0",
                "isGateway": true,
                "ipMasq": false,
                "ipam": {
                    "type": "host-local",
                    "dataDir": self.dir.join("cni-ipam"),
                    "routes": [{ "dst": "0.0.0.0/0" }],
                    "ranges": [[{ "subnet": DEFAULT_NET_SUBNET }]],
                },
            }],
        });
        fs::write(
            self.dir.join("cni/podman.conflist"),
            serde_json::to_vec_pretty(&net).expect("json"),
        )
        .expect("podman.conflist");
    }

    /// `podman <global flags> ARGS` in the topology's host namespace and the private
    /// mount namespace (nsenter).
    pub fn cmd(&self, args: &[&str]) -> Command {
        let d = |s: &str| self.dir.join(s).display().to_string();
        let holder = self.mounts.as_ref().expect("mount namespace").0.id();
        let mut c = Command::new("nsenter");
        c.args(["-t", &holder.to_string(), "-m", "-n", "podman"]);
        c.env("CONTAINERS_CONF", d("containers.conf"))
            .args(["--root", &d("root"), "--runroot", &d("runroot")])
            .args(["--tmpdir", &d("tmp"), "--hooks-dir", &d("hooks.d")])
            .args(["--storage-driver", "vfs", "--cgroup-manager=cgroupfs"])
            .args(["--runtime", "runc", "--events-backend", "file"])
            .args(args)
            .stdin(Stdio::null());
        c
    }

    /// `podman ARGS`, any outcome.
    pub fn output(&self, args: &[&str]) -> Output {
        output(&mut self.cmd(args))
    }

    /// `podman run` with the options every run here needs (the sandbox lacks
    /// CAP_SYS_RESOURCE: explicit ulimits), then `opts`, then `--rootfs` with the
    /// busybox rootfs and `command` (a boolean flag: what follows is the command).
    pub fn run_args(&self, opts: &[&str], command: &[&str]) -> Vec<String> {
        let mut a: Vec<String> = ["run", "--ulimit", "nofile=20000:20000"]
            .into_iter()
            .chain(["--ulimit", "nproc=32768:32768"])
            .map(str::to_owned)
            .collect();
        a.extend(opts.iter().map(|s| (*s).to_owned()));
        a.push("--rootfs".to_owned());
        a.push(self.rootfs.display().to_string());
        a.extend(command.iter().map(|s| (*s).to_owned()));
        a
    }

    /// `podman run OPTS --rootfs ROOTFS COMMAND`, any outcome.
    pub fn run(&self, opts: &[&str], command: &[&str]) -> Output {
        let a = self.run_args(opts, command);
        let a: Vec<&str> = a.iter().map(String::as_str).collect();
        self.output(&a)
    }

    /// The pid of container `name`'s init process (`podman inspect`).
    pub fn pid(&self, name: &str) -> u32 {
        let out = run(&mut self.cmd(&["inspect", "--format", "{{.State.Pid}}", name]));
        out.trim()
            .parse()
            .unwrap_or_else(|e| panic!("pid of {name}: {out:?}: {e}"))
    }

    /// The live processes that belong to this topology: every one whose command line
    /// or environment mentions its scratch directory (conmon, `podman container
    /// cleanup`, a `netns` hook or collector, whether configured by arguments or by
    /// `env`); never this process.
    pub fn processes(&self) -> Vec<Proc> {
        processes_mentioning(&self.topo.tmp)
    }

    /// Those of [`Podman::processes`] that run the `netns` binary.
    pub fn netns_processes(&self) -> Vec<Proc> {
        let bin = fs::canonicalize(self.topo.bin()).unwrap_or_else(|_| self.topo.bin());
        self.processes()
            .into_iter()
            .filter(|p| p.exe == bin)
            .collect()
    }

    /// Waits (up to `timeout`) until no process belongs to the topology; returns what
    /// is still there otherwise.
    pub fn wait_no_processes(&self, timeout: Duration) -> Result<(), Vec<Proc>> {
        match wait_for(timeout, || self.processes().is_empty().then_some(())) {
            Some(()) => Ok(()),
            None => Err(self.processes()),
        }
    }
}

impl Drop for Podman<'_> {
    fn drop(&mut self) {
        // Containers first (their poststop hooks need the namespaces and pins), then
        // whatever is left of ours (a conmon waiting for a stray child).
        let _ = self.output(&["rm", "-f", "-a", "-t", "0"]);
        if self.wait_no_processes(Duration::from_secs(10)).is_err() {
            for p in self.processes() {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(p.pid as i32),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
        // podman's per-container /dev/shm mounts go with the containers; detach any
        // still there so the directory can be removed.
        let mounts = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let mut under: Vec<&str> = mounts
            .lines()
            .filter_map(|l| l.split(' ').nth(4))
            .filter(|m| Path::new(m).starts_with(&self.dir))
            .collect();
        under.sort_by_key(|m| std::cmp::Reverse(m.len()));
        for m in under {
            let _ = nix::mount::umount2(m, nix::mount::MntFlags::MNT_DETACH);
        }
        // The mount namespace goes with its holder.
        drop(self.mounts.take());
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// A live process, as /proc shows it.
#[derive(Debug, Clone)]
pub struct Proc {
    pub pid: u32,
    /// What it runs (`/proc/PID/exe`).
    pub exe: PathBuf,
    /// Its command line.
    pub args: Vec<String>,
}

/// Live processes whose command line or environment mentions directory `dir` or a path
/// in it; never this process.
pub fn processes_mentioning(dir: &Path) -> Vec<Proc> {
    let path = dir.display().to_string();
    // "<dir>/..." or "...<dir>" at the end of an argument: never a sibling "<dir>1".
    let within = format!("{path}/");
    let me = std::process::id();
    let mut found = Vec::new();
    let Ok(rd) = fs::read_dir("/proc") else {
        return found;
    };
    for e in rd.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        if pid == me {
            continue;
        }
        // Zombies have an empty command line: only live processes count.
        let cmdline = fs::read(e.path().join("cmdline")).unwrap_or_default();
        if cmdline.is_empty() {
            continue;
        }
        let environ = fs::read(e.path().join("environ")).unwrap_or_default();
        let mentions = |b: &[u8]| {
            b.split(|c| *c == 0).any(|a| {
                let a = String::from_utf8_lossy(a);
                a.contains(&within) || a.ends_with(&path)
            })
        };
        if mentions(&cmdline) || mentions(&environ) {
            found.push(Proc {
                pid,
                exe: fs::read_link(e.path().join("exe")).unwrap_or_default(),
                args: cmdline
                    .split(|c| *c == 0)
                    .filter(|a| !a.is_empty())
                    .map(|a| String::from_utf8_lossy(a).into_owned())
                    .collect(),
            });
        }
    }
    found
}
